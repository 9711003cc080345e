"""The systems the bench scripts compare on one GPU, each training one step on a given batch.

- ours: built by train.py's own functions from a job config (train_configs/qwen3_bench.toml:
  fp32 master weights in FSDP2, bf16 compute, per-block compile, fused chunked loss, fused AdamW);
- hf: transformers' Qwen3ForCausalLM, same dimensions, random init, bf16 parameters, SDPA;
- torchtitan: torchtitan.models.qwen3 with its own parallelize function (per-block compile,
  compiled loss); precision "autocast" is its one-GPU default (fp32 weights and AdamW, bf16
  autocast), the same precision as ours; "bf16" casts its parameters to bf16 (faster, less exact).

Every system trains with AdamW and gradient clipping at 1.0. Batches are fresh random tokens each
step (`random_batch(step)`): one repeated batch is memorized within a few steps, which hides
divergence and flatters the loss.
"""

import dataclasses
import gc
import sys
import tempfile
import time
import types

import torch

from longctx import train  # train_step itself is what ours times
from longctx.checkpoint.source import weight_source
from longctx.config import parse_config
from longctx.launch import validate
from longctx.modeling import build_model
from longctx.models.common.args import args_to_hf_config
from longctx.optim import build_lr_schedule, build_optimizer

SYSTEMS = ("ours", "hf", "torchtitan")


def ours_config(config: str, flavor: str, seq: int, ac: str, ac_option: str, overrides=(), hf_weights=None) -> list[str]:
    argv = ["--job.config_file", config, "--model.flavor", flavor, "--training.seq_len", str(seq),
            "--activation_checkpoint.mode", ac, "--activation_checkpoint.selective_ac_option", ac_option]
    if hf_weights:
        argv += ["--checkpoint.initial_load_path", hf_weights, "--checkpoint.initial_load_in_hf"]
    return argv + list(overrides)


class Ours:
    name = "ours"

    def __init__(self, argv: list[str], device, doc_len: int = 0, **settings):
        self.job_config = parse_config(argv)
        self.job = validate(self.job_config)
        if settings:  # settings no config key reaches (the bench's FSDP on one rank, to time what it costs)
            self.job = self.job._replace(settings=dataclasses.replace(self.job.settings, **settings))
        job = self.job
        self.spec, self.model_args, self.parallel_dims, self.recipe, self.settings = (
            job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings)
        self.device, self.doc_len = device, doc_len
        self.model = build_model(self.spec, self.model_args, self.parallel_dims, self.settings, device,
                                 weight_source(self.job_config))
        self.optimizer = build_optimizer(self.model, self.job_config.optimizer)
        self.lr_schedule = build_lr_schedule(self.optimizer, self.job_config.lr_scheduler, 10**6)

    def step(self, inputs, labels) -> float:
        positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
        batch = {"input_ids": inputs, "labels": labels, "position_ids": positions}
        if self.doc_len:  # packed documents: per-document positions and mask (flex attention on CUDA)
            batch.update(position_ids=positions % self.doc_len, document_ids=positions // self.doc_len)
        return train.train_step(self.model, self.job, [batch], self.optimizer, self.lr_schedule, self.job_config,
                                self.device).loss.item()


class HF:
    name = "hf"

    def __init__(self, model_args, seq: int, device, checkpointing: bool):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = args_to_hf_config(model_args)
        cfg.update(max_position_embeddings=max(seq, model_args.max_seq_len), use_cache=False)
        config = Qwen3Config(**cfg)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            self.model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        if checkpointing:  # transformers has no selective mode: every layer is checkpointed
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def save(self, path: str) -> None:
        self.model.save_pretrained(path)

    def step(self, inputs, labels) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        # shift_labels: labels are already the next tokens, as in ours (no second shift).
        loss = self.model(input_ids=inputs, labels=labels, shift_labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        return loss.item()


def _torchtitan_qwen3():
    # torchtitan.models.qwen3's package __init__ imports its HF-datasets loader, which imports
    # `datasets`; these benches feed random tokens and use none of it. Where `datasets` is not
    # installed, an empty module stands in so that the model package imports (the one stand-in
    # left; install `datasets` to do without it).
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.Dataset = stub.load_dataset = None
        stub.distributed = types.ModuleType("datasets.distributed")
        stub.distributed.split_dataset_by_node = None
        sys.modules.update({"datasets": stub, "datasets.distributed": stub.distributed})
    import torchtitan.models.qwen3 as titan_qwen3

    return titan_qwen3


class TorchTitan:
    name = "torchtitan"

    def __init__(self, flavor: str, seq: int, device, ac: str, ac_option: str, precision: str = "autocast",
                 memory_budget: float = 0.5):
        import copy

        from torchtitan.components.loss import build_cross_entropy_loss
        from torchtitan.config import JobConfig as TitanJobConfig
        from torchtitan.distributed import ParallelDims as TitanParallelDims

        titan_qwen3 = _torchtitan_qwen3()
        cfg = TitanJobConfig()
        cfg.job.dump_folder = tempfile.mkdtemp(prefix="titan_bench_")
        cfg.training.seq_len = seq
        cfg.compile.enable, cfg.compile.components = True, ["model", "loss"]
        cfg.activation_checkpoint.mode = ac
        cfg.activation_checkpoint.selective_ac_option = ac_option
        cfg.activation_checkpoint.memory_budget = memory_budget  # mode "memory_budget" only
        model_args = copy.deepcopy(titan_qwen3.qwen3_args[flavor])
        model_args.update_from_config(cfg)
        with torch.device("meta"):
            self.model = titan_qwen3.Qwen3Model(model_args)
        dims = TitanParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
        titan_qwen3.parallelize_qwen3(self.model, dims, cfg)  # one GPU: AC + compile, no FSDP
        self.model.to_empty(device=device)
        if precision == "bf16":
            self.model.to(torch.bfloat16)
        # torchtitan's train step on one GPU without FSDP: fp32 weights under bf16 autocast.
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast")
        torch.manual_seed(0)
        with torch.no_grad():
            self.model.init_weights(buffer_device=device)  # re-ties embeddings; fp32 RoPE cache
        self.model.train()
        self.loss_fn = build_cross_entropy_loss(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def step(self, inputs, labels) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            pred = self.model(inputs)
            loss = self.loss_fn(pred, labels) / labels.numel()
        del pred  # as torchtitan's train step: free the logits before backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        return loss.item()


def build_system(name: str, args, seq: int, device, model_args, hf_weights=None):
    """args: the bench's parsed arguments (flavor, config, ac, ac_option, override, doc_len, titan_precision)."""
    if name == "ours":
        argv = ours_config(args.config, args.flavor, seq, args.ac, args.ac_option, args.override, hf_weights)
        return Ours(argv, device, args.doc_len)
    if name == "hf":
        return HF(model_args, seq, device, checkpointing=args.ac != "none")
    return TorchTitan(args.flavor, seq, device, args.ac, args.ac_option, args.titan_precision)


def add_system_arguments(p) -> None:
    p.add_argument("--flavor", default="0.6B", help="Qwen3 size: 0.6B, 1.7B, ...")
    p.add_argument("--systems", default="ours,hf,torchtitan", help=f"comma-separated, from {SYSTEMS}")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective"), help="activation checkpointing")
    p.add_argument("--ac-option", default="2", help="selective: checkpoint every N-th block, or op (keep attention outputs); hf: full")
    p.add_argument("--config", default="train_configs/qwen3_bench.toml", help="our job config")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value for ours")
    p.add_argument("--doc-len", type=int, default=0, help="ours: pack the row as documents of this many tokens "
                   "(per-document positions and mask: flex attention on CUDA); 0: one document")
    p.add_argument("--titan-precision", default="autocast", choices=("autocast", "bf16"),
                   help="torchtitan: fp32 weights under bf16 autocast (its one-GPU default), or pure bf16 parameters")


def systems_from(args) -> list[str]:
    names = args.systems.split(",")
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; choose from {SYSTEMS}")
    if args.doc_len and names != ["ours"]:
        raise SystemExit(f"--doc-len {args.doc_len} times ours only (the others take no document mask); add --systems ours")
    return [s for s in SYSTEMS if s in names]


def model_args_for(args):
    return validate(parse_config(["--job.config_file", args.config, "--model.flavor", args.flavor])).model_args


# ---------------------------------------------------------------- measurement
def random_batch(seq: int, vocab: int, device, step: int):
    """Fresh random tokens for each step; the same step gives every system the same batch."""
    g = torch.Generator().manual_seed(1234 + step)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(system, seq: int, vocab: int, device, first_step: int, n: int) -> tuple[list[float], list[float]]:
    """(seconds, loss) of n steps, each on a new batch, each ending in a host sync. Every system
    runs with Python's garbage collection scheduled as train.py and torchtitan's trainer do (every
    50 steps, not at an arbitrary step)."""
    times, losses = [], []
    with train.ScheduledGC(50) as collector:
        for step in range(first_step, first_step + n):
            batch = random_batch(seq, vocab, device, step)
            sync(device)
            start = time.perf_counter()
            losses.append(system.step(*batch))
            sync(device)
            times.append(time.perf_counter() - start)
            collector.step(step + 1)
    return times, losses


def memory_gib(device) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


# cuBLAS workspaces and the like stay allocated between systems; a model never weighs this little.
LEFTOVER_BYTES = 256 * 2**20


def reset_memory(device) -> None:
    """Start a peak measurement. Refuses to start over an earlier system that is still allocated:
    max_memory_allocated would count it into this one's peak."""
    free()
    if device.type == "cuda":
        leftover = torch.cuda.memory_allocated(device)
        if leftover > LEFTOVER_BYTES:
            raise RuntimeError(f"{leftover / 2**30:.2f} GiB of an earlier system is still allocated; "
                               "drop every reference to it before the next measurement")
        torch.cuda.reset_peak_memory_stats(device)


def free() -> None:
    """Collect what nothing refers to any more and hand the cached blocks back. Call it once the
    last reference to a system is gone: a frame that still holds one keeps all of it alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
