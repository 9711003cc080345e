"""What every command does before and after its work: the checks before any process group, the
process group itself, and an exit code that tells the truth on every rank.

    validate(job_config) -> Job        what needs the model or the data, before any process group
    init_distributed(job_config)       NCCL on GPUs, gloo on CPU, a 1-process group for plain python
    run_command(main)                  exit 0 done, 2 a refused input (one `error:` line), 1 a bug
                                       (its traceback), or main's own code (train.py: 3, a non-finite step)
"""

import contextlib
import functools
import os
import socket
import sys
import traceback
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from longctx import validation
from longctx.base import ConfigError, DataError, UserError, global_rank, log
from longctx.config import JobConfig
from longctx.modeling import model_spec_and_args
from longctx.models.common.args import DecoderArgs
from longctx.models.common.spec import ModelSpec
from longctx.parallelisms.activation_checkpoint import block_checkpointing
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import ModelSettings
from longctx.parallelisms.ulysses import kv_heads_to_send
from longctx.planner import auto
from longctx.planner.memory import GIB, layout_for
from longctx.recipes import Recipe, build_recipe


class Job(NamedTuple):
    """What a job config decides, checked: the model family and dimensions, the layout on this
    many processes, the recipe with its data opened (and the held-out one, with validation), and how
    the model is wrapped and run."""

    spec: ModelSpec
    model_args: DecoderArgs
    parallel_dims: ParallelDims
    recipe: Recipe
    settings: ModelSettings
    held_out: Recipe | None = None  # validation.dataset_path through the same recipe; None without validation


def validate(job_config: JobConfig) -> Job:
    """Everything that can be refused before a process group exists and needs the model or the data
    (config values alone are parse_config's VALUE_RULES): family and flavor, layout against the
    heads, tokenizer and data, training and held-out alike. Each refusal is a UserError naming the
    key or file."""
    spec, model_args = model_spec_and_args(job_config)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel_dims = ParallelDims.from_config(job_config.parallelism, world_size, model_args.n_heads, model_args.n_kv_heads)
    recipe = build_recipe(job_config)
    check_recipe(recipe, model_args.vocab_size, ("training.seq_len", job_config.training.seq_len))
    held_out = None
    if job_config.validation.enable:  # held-out data is read and checked exactly as training data
        held_out = build_recipe(job_config, "validation")
        check_recipe(held_out, model_args.vocab_size, validation.held_out_rows(job_config)[0])
    settings = model_settings(job_config, model_args, parallel_dims)
    return Job(spec, model_args, parallel_dims, recipe, settings, held_out)


def check_recipe(recipe: Recipe, vocab_size: int, longest_row: tuple[str, int]) -> None:
    """A recipe's data against the model and the longest row (the key that sets it, its tokens)."""
    if recipe.vocab_size > vocab_size:
        raise ConfigError(f"tokenizer vocab {recipe.vocab_size} exceeds the model's vocab_size {vocab_size}")
    # Token ids given as numbers in the data (policy rollouts); out of range, one would be a
    # device-side assert at the step that reaches it.
    largest_id, where = getattr(recipe, "largest_token_id", (-1, ""))
    if largest_id >= vocab_size:
        raise DataError(f"{where}: token id {largest_id} >= the model's vocab_size {vocab_size}; "
                        "the rollouts were tokenized for another model")
    # Documents a recipe trains whole (policy rollouts): one longer than the longest row would be
    # cut at every stage, its tail never trained.
    longest, where = getattr(recipe, "longest_document", (0, ""))
    key, tokens = longest_row
    if longest > tokens:
        raise DataError(f"{where}: the rollout has {longest} tokens, more than {key}={tokens}; "
                        f"a rollout trains whole: raise {key} or drop the rollout")


def model_settings(job_config: JobConfig, model_args: DecoderArgs, parallel_dims: ParallelDims,
                   device_type: str | None = None, budget_bytes: float | None = None) -> ModelSettings:
    """How the job wraps and runs its model (parallelisms/settings.py), decided here once: from the
    config, or under activation_checkpoint.mode = "auto" the fastest settings the planner fits in
    budget_bytes (default: activation_checkpoint.memory_budget_gib, else this device's memory less
    planner/auto.MARGIN). device_type: where the run will be (default: this machine's); plan.py
    plans for "cuda" on a CPU."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    ac, training, p = job_config.activation_checkpoint, job_config.training, job_config.parallelism
    cuda = device_type == "cuda"
    # CPU runs are the fp32 reference; on GPUs training.mixed_precision_param is the compute dtype.
    compute = torch.bfloat16 if cuda and training.mixed_precision_param == "bfloat16" else torch.float32
    # FSDP wherever weights are sharded, replicated or held on the host, and under TP on GPUs (its
    # mixed precision casts the DTensor weights); one plain rank runs under autocast (torchtitan's choice).
    fsdp = parallel_dims.fsdp_enabled or training.enable_cpu_offload or (cuda and parallel_dims.tp > 1)
    n_layers = model_args.n_layers
    settings = ModelSettings(
        checkpointing=("full",) * n_layers if ac.mode == "auto" else block_checkpointing(ac.mode, ac.selective_ac_option, n_layers),
        compile=job_config.compile.enable, compile_backend=job_config.compile.backend, mlp_chunk=ac.mlp_chunk_size,
        activation_offload=ac.cpu_offload, attention_groups=ac.attention_kv_groups, compute_dtype=compute, fsdp=fsdp,
        reshard_after_forward=p.fsdp_reshard_after_forward != "never", cpu_offload=training.enable_cpu_offload,
        loss_parallel=parallel_dims.tp > 1 and not p.disable_loss_parallel, loss_chunk=job_config.recipe.loss_chunk_size)
    if ac.mode != "auto":
        return settings
    return auto_settings(job_config, model_args, parallel_dims, settings, device_type, budget_bytes)


def auto_settings(job_config: JobConfig, model_args: DecoderArgs, parallel_dims: ParallelDims, base: ModelSettings,
                  device_type: str, budget_bytes: float | None) -> ModelSettings:
    """planner/auto's choice for this job, sized for its longest row; one log line says it."""
    if budget_bytes is None:
        configured = job_config.activation_checkpoint.memory_budget_gib
        budget_bytes = configured * GIB if configured > 0 else device_memory(device_type) * (1 - auto.MARGIN)
    table = auto_candidates(job_config, model_args, parallel_dims, base, budget_bytes)
    best, seq_len = table[0], job_config.training.seq_len
    if best.peak > budget_bytes:
        raise ConfigError(f"activation_checkpoint.mode=auto: nothing fits {budget_bytes / GIB:.1f} GiB at training.seq_len="
                          f"{seq_len}: the smallest plan needs {min(c.peak for c in table) / GIB:.1f} GiB; shorten seq_len, "
                          "add GPUs (context_parallel_degree) or set training.enable_cpu_offload")
    log(f"auto layout: {best.settings.describe()}; planned peak {best.peak / GIB:.1f} of {budget_bytes / GIB:.1f} GiB")
    return best.settings


def auto_candidates(job_config: JobConfig, model_args: DecoderArgs, parallel_dims: ParallelDims, base: ModelSettings,
                    budget_bytes: float) -> list:
    """planner/auto.choose on this job's mesh and longest row (scripts/plan.py --explain prints it)."""
    training = job_config.training
    layout_of = functools.partial(layout_for, parallel_dims=parallel_dims, seq_len=training.seq_len,
                                  batch=training.local_batch_size)
    ulysses = parallel_dims.cp_ulysses
    kv_heads = kv_heads_to_send(model_args.n_kv_heads // parallel_dims.tp, ulysses) // ulysses  # per rank, in attention
    return auto.choose(model_args, layout_of, base, fsdp_required=base.fsdp, kv_heads=kv_heads, budget_bytes=budget_bytes)


def device_memory(device_type: str) -> int:
    """Bytes of memory of this rank's GPU, or of this host for CPU runs."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_output(flag: str, path: str, folder: bool = False) -> None:
    """A command's output path (a file, or with folder=True one to create), before any work: work
    that ends in an unwritable path is lost, and a missing parent folder created on the way would
    hide a typo. One line naming the flag."""
    parent = os.path.dirname(os.path.abspath(path))
    if folder and os.path.isfile(path):
        problem = "is a file; give a folder path"
    elif not folder and os.path.isdir(path):
        problem = "is a folder; give a file path"
    elif not os.path.isdir(parent):
        problem = f"is in {parent!r}, which is not an existing folder; create it or fix the path"
    elif not os.access(parent, os.W_OK):
        problem = f"is in {parent!r}, which this user cannot write to"
    else:
        return
    raise ConfigError(f"{flag} {path!r} {problem}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(job_config: JobConfig) -> torch.device:
    """NCCL on GPUs, gloo on CPU; also a 1-process group so one code path serves every layout.
    With FSDP's CPU offload, collectives on host tensors (gradient norm, checkpoint state) go over
    gloo (torchtitan's choice too)."""
    if "WORLD_SIZE" not in os.environ:  # plain `python train.py`: a 1-process group on a free port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if job_config.training.enable_cpu_offload else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=job_config.comm.init_timeout_seconds))
    return device


@contextlib.contextmanager
def distributed(job_config: JobConfig):
    """The command's process group around its work; yields the device. After work that succeeded
    every rank waits for the others before tearing it down (no rank closes its connections while a
    peer still needs them). A failure leaves it to the process's exit: tearing down NCCL with a
    collective still pending on a peer can hang."""
    device = init_distributed(job_config)
    yield device
    dist.barrier()
    dist.destroy_process_group()


def run(main, argv: list[str]) -> int:
    """main(argv) -> the command's exit code: main's return value (None: 0); 2 after one `error:`
    line for a refused input, said by rank 0 alone (every rank finds it); argparse's own code for
    --help and usage errors; 1 after the traceback of anything else (a bug keeps its traceback)."""
    try:
        return main(argv) or 0
    except UserError as e:
        if global_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:  # argparse: --help (0), a usage error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # a bug (or Ctrl-C outside the training loop)
        traceback.print_exc()
        return 1


def run_command(main) -> None:
    """A command's `__main__`: run(main, sys.argv[1:]), then exit with its code on every rank.

    The process leaves through os._exit once its output is flushed: process groups that a
    DeviceMesh still holds, left to interpreter teardown, abort a process that did all its work
    (gloo's threads: "terminate called without an active exception", exit -6, about one run in
    four), and a pipeline that reads the exit code would see a failed job."""
    code = run(main, sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
