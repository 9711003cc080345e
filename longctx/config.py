"""Job config: torchtitan 0.2.2's JobConfig (TOML + `--section.key` CLI overrides) plus our fields.

Every error while parsing becomes one line naming the bad key or value (ConfigError)."""

import contextlib
import io
import math
import os
import re
import types
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal, Union, get_args, get_origin

import tomllib
from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TitanJobConfig
from torchtitan.config.job_config import ActivationCheckpoint as TitanActivationCheckpoint
from torchtitan.config.job_config import Checkpoint as TitanCheckpoint
from torchtitan.config.job_config import Model as TitanModel
from torchtitan.config.job_config import Parallelism as TitanParallelism
from torchtitan.config.job_config import Profiling as TitanProfiling
from torchtitan.config.job_config import Training as TitanTraining
from torchtitan.config.job_config import Validation as TitanValidation

from longctx.base import MAX_SEQ_LEN, ConfigError


@dataclass
class Model(TitanModel):
    name: str = "qwen3"
    """Model family: "qwen3" or "qwen2" (Qwen2 and Qwen2.5)."""

    flavor: str = "debugmodel"
    """A size of the family (see models/<family>/__init__.py), or an HF model folder / config.json."""

    hf_assets_path: str = "assets/debug"
    """Folder with tokenizer.json (and tokenizer_config.json): an HF model folder works."""

    rope_scaling: dict[str, int | float | bool | str] | None = None
    """RoPE scaling for context extension, overriding config.json's, e.g. {type = "yarn", factor = 4.0,
    original_max_position_embeddings = 32768} (also beta_fast, beta_slow, attention_factor, mscale,
    mscale_all_dim, truncate), {type = "linear", factor = 2.0}, or {type = "default"} for none.
    On the command line: --model.rope_scaling type yarn factor 4.0 original_max_position_embeddings 32768.
    HF exports write it into config.json. See models/common/rope.py."""


@dataclass
class Parallelism(TitanParallelism):
    context_parallel_ulysses_degree: int = -1
    """How many of the context_parallel_degree ranks split attention heads (Ulysses all-to-all);
    the rest split the sequence into head-tail chunks and all-gather K/V. -1: the largest degree
    the local heads allow (it divides the query heads, and divides or is a multiple of the kv heads)."""


@dataclass
class Training(TitanTraining):
    dataset: str = "auto"
    """Format of training.dataset_path: "auto" (from the file extension), "text", "json" or "parquet"."""

    dataset_path: str | None = "assets/debug/corpus.jsonl"
    """A local file or folder of documents (text, JSON lines or parquet), or for recipe.name =
    "pretrain" a folder written by scripts/tokenize_corpus.py (any size: each rank reads only its rows)."""

    seq_len_schedule: list[list[int]] | None = None
    """Staged context extension: [[step, seq_len], ...], e.g. [[0, 32768], [2000, 65536], [4000, 131072]]:
    from step S on (steps count from 1; the first S is 0), rows are seq_len tokens. S increasing; the
    largest seq_len must equal training.seq_len. Each stage compiles once. Set it in the TOML."""

    skip_nonfinite_steps: int = 0
    """Steps whose loss or grad norm is NaN/inf the run may skip (batch dropped, weights and LR
    schedule unchanged, counted as skipped_steps) before it stops with exit code 3; 0: stop at the first."""

    balance: Literal["flops", "none"] = "flops"
    """How a step's global batch is dealt to dp ranks and micro-batches. "flops": by each row's
    modelled work, sum over its documents of a*L + b*L^2 (the model's own flops: document-masked
    attention grows with the square of each document's length), so that no rank waits long for
    another; SFT and policy rows, whose documents are never split, may also be re-packed. The
    same documents train in the same step either way. "none": rows dealt in stream order."""


@dataclass
class Checkpoint(TitanCheckpoint):
    export_interval: int = 0
    """Export a Hugging Face folder to {dump_folder}/hf/step-N every N steps (0: never); in
    export_dtype. last_save_in_hf exports at the last step. See components/hf.py."""

    export_max_shard_gb: float = 5.0
    """Largest safetensors file of an HF export, in GB (like transformers' max_shard_size)."""


@dataclass
class ActivationCheckpoint(TitanActivationCheckpoint):
    cpu_offload: bool = False
    """Park each checkpointed block's input in pinned host memory during forward and bring it
    back one block ahead in backward (needs mode full or selective). Frees L x T x dim bf16
    values of device memory; see parallelisms/activation_checkpoint.py."""

    mlp_chunk_size: int = 0
    """Tokens per tile of the tiled MLP (0: off): the SwiGLU runs over sequence tiles, each
    recomputed in backward, so its [T, hidden_dim] intermediates never exist whole."""


@dataclass
class Validation(TitanValidation):
    """Held-out loss every `freq` steps (components/validation.py)."""

    dataset: str = "auto"
    """Format of validation.dataset_path: "auto" (from the file extension), "text", "json" or "parquet"."""

    dataset_path: str | None = None
    """Held-out documents (a file or folder, like training.dataset_path), read by the run's recipe and packed alike."""

    local_batch_size: int = -1
    """Rows per dp rank of one validation batch; -1: training.local_batch_size."""

    seq_len: int = -1
    """Tokens per packed validation row; -1: training.seq_len."""

    steps: int = 10
    """Validation batches per evaluation, the same batches every time (the whole set, -1, is not supported)."""

    def __post_init__(self):
        pass  # torchtitan asserts here; components/validation.check refuses bad values in one line


@dataclass
class Profiling(TitanProfiling):
    all_ranks: bool = False
    """Write traces and memory snapshots on every rank; false: rank 0 only (the ranks run the same program)."""


@dataclass
class Recipe:
    name: Literal["pretrain", "sft", "policy"] = "pretrain"
    """What one step computes: "pretrain" (packed text, next-token loss), "sft" (chat records,
    loss on assistant turns only), "policy" (offline rollouts, clipped policy-gradient loss)."""

    text_field: str = "text"
    """pretrain: the JSON/parquet column that holds document text."""

    messages_field: str = "messages"
    """sft: the column that holds a record's chat turns ([{"role": ..., "content": ...}, ...])."""

    chat_template_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """sft, and policy with apply_chat_template: extra variables of the model's chat template, a
    TOML table such as {enable_thinking = false} (CLI: --recipe.chat_template_kwargs enable_thinking False)."""

    apply_chat_template: bool = False
    """policy: render "prompt"/"response" text with the model's chat template (the prompt as the
    user turn with the generation prompt, the response as the assistant turn) before tokenizing."""

    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy: the logits of one chunk exist at a time."""

    clip_eps: float = 0.2
    """policy: the importance ratio is clipped to [1 - clip_eps, 1 + clip_eps] (PPO's epsilon)."""


@dataclass
class JobConfig(TitanJobConfig):
    model: Model = field(default_factory=Model)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    training: Training = field(default_factory=Training)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)
    recipe: Recipe = field(default_factory=Recipe)


def _check_cli_keys(args: list[str]) -> None:
    """tyro reports unknown flags in a multi-line box; name the bad key in one line instead."""
    sections = {f.name: f.type for f in fields(JobConfig)}
    for arg in args:
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        section, _, name = key.partition(".")
        name = name.split(".")[0]  # a nested section's key (training.dataloader.num_workers): tyro checks the rest
        if section not in sections or not is_dataclass(sections[section]):
            raise ConfigError(f"unknown config section in {arg!r}; valid sections: {', '.join(sections)}")
        valid = {f.name for f in fields(sections[section])}
        if name.startswith("no_") and name[3:] in valid:  # tyro's --section.no-flag for booleans
            name = name[3:]
        if name not in valid:
            raise ConfigError(f"unknown config key --{section}.{name}; valid keys of [{section}]: {', '.join(sorted(valid))}")


def _one_line(tyro_output: str) -> str:
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", tyro_output).split())
    match = re.search(r"(Error parsing .*?)(?: Argument helptext| For full helptext|$)", text)
    return match.group(1) if match else text[:300]


def _config_file(args: list[str]) -> str | None:
    """The --job.config_file argument, which must exist."""
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key.startswith("--") and key[2:].replace("-", "_") == "job.config_file":
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            if not os.path.isfile(path):
                raise ConfigError(f"--job.config_file {path!r} does not exist; see train_configs/ for examples")
            return path
    return None


def _type_ok(value, annotation) -> bool:
    """Only the simple annotations job configs use; anything else is left to its consumer."""
    origin = get_origin(annotation)
    if origin is Literal:
        return value in get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list or annotation is list:
        return isinstance(value, list)
    if origin is dict:
        key_type, value_type = get_args(annotation)
        return isinstance(value, dict) and all(_type_ok(k, key_type) and _type_ok(v, value_type) for k, v in value.items())
    return True


def _check_types(config, section: str = "") -> None:
    """TOML values reach the dataclasses unchecked (only the CLI goes through tyro's parsing)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            _check_types(value, f"{section}{f.name}.")
        elif not _type_ok(value, f.type):
            raise ConfigError(f"{section}{f.name} = {value!r} does not match its type {f.type}; fix the TOML value")




def _finite(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """Accepts finite numbers in the interval [low, high] (ends open where asked)."""
    return lambda v: (math.isfinite(v) and (v > low if low_open else v >= low)
                      and (v < high if high_open else v <= high))


# Every numeric key whose nonsense value would crash later (after the process group, or hours in)
# or train silently wrong: (key, accepts the value, what to set). [validation] and [profiling]
# check their own in train.py.
VALUE_RULES = (
    ("job.dump_folder", lambda v: not os.path.isfile(v), "a folder, not a file"),
    ("training.steps", _finite(1), "an integer >= 1 (the optimizer steps to run; 0 would train nothing)"),
    ("training.seq_len", _finite(1, MAX_SEQ_LEN),
     f"between 1 and 2**24 = {MAX_SEQ_LEN} (RoPE positions are fp32, exact only up to 2**24)"),
    ("training.local_batch_size", _finite(1), "an integer >= 1"),
    ("training.global_batch_size", lambda v: v == -1 or v >= 1, "-1 (local_batch_size x dp) or an integer >= 1"),
    ("training.gc_freq", _finite(1), "an integer >= 1 (steps between Python garbage collections)"),
    ("training.max_norm", _finite(0, low_open=True), "a finite number > 0 (gradient clipping)"),
    ("optimizer.name", lambda v: v in ("Adam", "AdamW"), '"AdamW" or "Adam"'),
    ("optimizer.lr", _finite(0), "a finite number >= 0"),
    ("optimizer.beta1", _finite(0, 1, high_open=True), "a number in [0, 1)"),
    ("optimizer.beta2", _finite(0, 1, high_open=True), "a number in [0, 1)"),
    ("optimizer.eps", _finite(0), "a finite number >= 0"),
    ("optimizer.weight_decay", _finite(0), "a finite number >= 0"),
    ("lr_scheduler.warmup_steps", _finite(0), "an integer >= 0"),
    ("lr_scheduler.total_steps", lambda v: v is None or v >= 1, "an integer >= 1 (unset: training.steps)"),
    ("lr_scheduler.decay_ratio", lambda v: v is None or _finite(0, 1)(v), "a number in [0, 1] (unset: decay after warmup)"),
    ("lr_scheduler.min_lr_factor", _finite(0, 1), "a number in [0, 1]"),
    ("checkpoint.interval", _finite(1), "an integer >= 1 (steps between saves)"),
    ("checkpoint.keep_latest_k", lambda v: v == 0 or v >= 2,
     "0 (keep all) or >= 2: with 1, no complete checkpoint would exist while the next one is written"),
    ("checkpoint.load_step", lambda v: v >= -1, "-1 (the latest) or a saved step"),
    ("checkpoint.export_interval", _finite(0), "an integer >= 0 (0: never)"),
    ("checkpoint.export_max_shard_gb", _finite(0, low_open=True), "a finite number > 0"),
    ("metrics.log_freq", _finite(1), "an integer >= 1 (steps between logged lines)"),
    ("comm.init_timeout_seconds", _finite(1), "an integer >= 1"),
    ("debug.seed", lambda v: v is None or v >= 0, "an integer >= 0"),
    ("recipe.loss_chunk_size", _finite(1), "an integer >= 1 (tokens per cross-entropy chunk)"),
    ("recipe.clip_eps", _finite(0, low_open=True), "a finite number > 0 (PPO's clip range)"),
)

ALL = "*"
# Keys inherited from torchtitan's JobConfig that no code here reads (found by grepping this repo
# and the torchtitan functions it calls: build_optimizers, build_lr_schedulers, CheckpointManager,
# ConfigManager). Accepted, they would let a user believe that e.g. float8, pipeline parallel or
# wandb is on; so each is refused when set to anything but its default. ALL: the whole section.
# Keys that components/config.py adds are all read; [validation] and [profiling] are train.py's.
UNSUPPORTED = {
    "job": ("print_config", "save_config_file", "custom_config_module"),  # description: the TOML's own label
    "metrics": ("disable_color_printing", "save_for_all_ranks", "enable_wandb"),
    "model": ("tokenizer_path", "converters", "print_after_conversion"),  # model.hf_assets_path holds the tokenizer
    "optimizer": ("early_step_in_backward",),  # it would step before gradient clipping
    "training": ("dtype", "mixed_precision_reduce", "gc_debug", "dataloader"),
    "parallelism": ("enable_async_tensor_parallel", "pipeline_parallel_degree", "module_fqns_per_model_part",
                    "pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers",
                    "pipeline_parallel_layers_per_stage", "pipeline_parallel_schedule", "pipeline_parallel_schedule_csv",
                    "pipeline_parallel_microbatch_size", "pipeline_parallel_expert_parallel_overlap",
                    "context_parallel_load_balancer", "context_parallel_rotate_method",  # ring attention's; ours is Ulysses
                    "expert_parallel_degree", "expert_tensor_parallel_degree", "expert_parallel_comm_backend"),
    "checkpoint": ("enable_ft_dataloader_checkpoints", "initial_load_in_hf_quantized", "last_save_model_only",
                   "create_seed_checkpoint"),
    "activation_checkpoint": ("per_op_sac_force_recompute_mm_shapes_by_fqns", "early_stop", "memory_budget",
                              "visualize_memory_budget_pareto", "preserve_rng_state", "determinism_check", "debug"),
    "compile": ("components",),
    "comm": ("train_timeout_seconds", "trace_buf_size", "save_traces_folder", "save_traces_file_prefix", "mode"),
    "debug": ("moe_force_load_balance",),
    "quantize": ALL,
    "memory_estimation": ALL,
    "fault_tolerance": ALL,
    "experimental": ALL,
}


def _check_values(config: JobConfig) -> None:
    for key, accepts, requirement in VALUE_RULES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not accepts(value):
            raise ConfigError(f"{key}={value!r} is invalid: it must be {requirement}")


def _changed(values, defaults, prefix: str, names):
    """(key, value) of every field in names (ALL: every one) that differs from defaults, nested sections too."""
    for f in fields(values):
        value, default = getattr(values, f.name), getattr(defaults, f.name)
        if names != ALL and f.name not in names:
            continue
        if is_dataclass(value):
            yield from _changed(value, default, f"{prefix}.{f.name}", ALL)
        elif value != default:
            yield f"{prefix}.{f.name}", value


def _check_supported(config: JobConfig) -> None:
    for section, names in UNSUPPORTED.items():
        values = getattr(config, section)
        for key, value in _changed(values, type(values)(), section, names):
            raise ConfigError(f"{key}={value!r} is not supported here (a torchtitan key this repo never reads); remove it")


def parse_config(args: list[str]) -> JobConfig:
    _check_cli_keys(args)
    config_file = _config_file(args)
    manager = ConfigManager(JobConfig)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            config = manager.parse_args(args)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise ConfigError(_one_line(stderr.getvalue())) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{config_file}: TOML syntax error: {' '.join(str(e).split())}") from None
    except (ValueError, TypeError, OSError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"bad job config: {message}") from None
    _check_types(config)
    _check_values(config)
    _check_supported(config)
    return config
