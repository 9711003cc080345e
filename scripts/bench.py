"""Time one training step on one GPU: ours, Hugging Face transformers' Qwen3, torchtitan 0.2.2's Qwen3.

    python scripts/bench.py --flavor 0.6B --seq 8192                     # the speed table
    python scripts/bench.py --flavor 1.7B --seq 32768 --ac full --systems ours,torchtitan
    python scripts/bench.py --flavor 0.6B --max-seq --seq 16384 --ac full --systems hf
    python scripts/bench.py --probe-attention                            # SDPA kernels on this card

Every system trains the same random batch (batch 1) with AdamW and gradient clipping:
- ours: built by train.py's own functions from train_configs/qwen3_bench.toml (fp32 master
  weights in FSDP2, bf16 compute, per-block compile, fused chunked loss, fused AdamW);
- hf: transformers' Qwen3ForCausalLM, same config, random init, bf16 parameters, SDPA;
- torchtitan: torchtitan.models.qwen3 with its own parallelize function (per-block compile,
  compiled loss), pure bf16 parameters (its fastest single-GPU setting).
Flops per token follow docs/design.md (6*N_nonembedding + 6*d*V + 12*L*H*Q*T); MFU is against
989.4 TFLOP/s. Times are the median of the steps after warm-up, each ending in a host sync.
"""

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment

import torch  # noqa: E402

import recipes.pretrain  # noqa: E402
import train  # noqa: E402  (times train.train_step itself)
from components.build import build_model, init_distributed, validate  # noqa: E402
from components.config import parse_config  # noqa: E402
from components.metrics import H100_BF16_DENSE_FLOPS  # noqa: E402
from models.common import attention  # noqa: E402
from models.common.args import args_to_hf_config  # noqa: E402

SYSTEMS = ("ours", "hf", "torchtitan")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="0.6B", help="Qwen3 size: 0.6B, 1.7B, ...")
    p.add_argument("--seq", type=int, default=8192, help="sequence length (--max-seq: where the search starts)")
    p.add_argument("--systems", default="ours,hf,torchtitan", help=f"comma-separated, from {SYSTEMS}")
    p.add_argument("--ac", default="none", choices=("none", "full", "selective"), help="activation checkpointing")
    p.add_argument("--ac-option", default="2", help="selective: checkpoint every N-th block, or op (keep attention outputs); hf: full")
    p.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--config", default="train_configs/qwen3_bench.toml", help="our job config")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value for ours")
    p.add_argument("--doc-len", type=int, default=0, help="ours: pack the row as documents of this many tokens "
                   "(per-document positions and mask: flex attention on CUDA); 0: one document")
    p.add_argument("--loss-chunks", default="", help="ours: also time these loss chunk sizes (e.g. 8192,16384)")
    p.add_argument("--sdpa", default="", help="ours: SDPA kernel priority, e.g. flash,cudnn (default: attention.py's)")
    p.add_argument("--max-seq", action="store_true", help="find the longest sequence each system trains a step at")
    p.add_argument("--seq-cap", type=int, default=1 << 20, help="--max-seq: never try longer than this")
    p.add_argument("--granularity", type=int, default=8192, help="--max-seq: bisect down to this many tokens")
    p.add_argument("--profile", default="", help="write a kernel-time profile of ours here (a .txt path)")
    p.add_argument("--probe-attention", action="store_true", help="time each SDPA kernel for causal GQA and exit")
    return p.parse_args(argv)


# ---------------------------------------------------------------- systems
class System:
    """A built model + optimizer that trains one step on (inputs, labels) and returns the loss."""

    name = ""

    def step(self, inputs, labels) -> float:
        raise NotImplementedError


class Ours(System):
    name = "ours"

    def __init__(self, args, seq, device, hf_weights=None):
        from torchtitan.components.lr_scheduler import build_lr_schedulers
        from torchtitan.components.optimizer import build_optimizers

        argv = ["--job.config_file", args.config, "--model.flavor", args.flavor, "--training.seq_len", str(seq),
                "--activation_checkpoint.mode", args.ac, "--activation_checkpoint.selective_ac_option", args.ac_option]
        if hf_weights:
            argv += ["--checkpoint.initial_load_path", hf_weights, "--checkpoint.initial_load_in_hf"]
        self.job_config = parse_config(argv + args.override)
        self.spec, self.model_args, self.parallel_dims, self.recipe = validate(self.job_config)
        self.device, self.doc_len = device, args.doc_len
        self.model = build_model(self.spec, self.model_args, self.parallel_dims, self.job_config, device)
        self.optimizers = build_optimizers([self.model], self.job_config.optimizer, self.parallel_dims)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, self.job_config.lr_scheduler, 10**6)

    def step(self, inputs, labels):
        positions = torch.arange(inputs.size(1), device=inputs.device).expand_as(inputs)
        batch = {"input_ids": inputs, "labels": labels, "position_ids": positions}
        if self.doc_len:
            batch.update(position_ids=positions % self.doc_len, document_ids=positions // self.doc_len)
        result = train.train_step(self.model, self.recipe, [batch], self.parallel_dims, self.optimizers,
                                  self.lr_schedulers, self.job_config, self.device)
        return result[0]


class HF(System):
    name = "hf"

    def __init__(self, args, seq, device, model_args):
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = args_to_hf_config(model_args)
        cfg.update(max_position_embeddings=max(seq, model_args.max_seq_len), use_cache=False)
        config = Qwen3Config(**cfg)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            self.model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        if args.ac != "none":  # transformers has no selective mode: every layer is checkpointed
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def save(self, path):
        self.model.save_pretrained(path)

    def step(self, inputs, labels):
        self.optimizer.zero_grad(set_to_none=True)
        # shift_labels: labels are already the next tokens, as in ours (no second shift).
        loss = self.model(input_ids=inputs, labels=labels, shift_labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        return loss.item()


def _import_torchtitan_qwen3():
    # torchtitan.models.qwen3 imports its HF-datasets loader at package import; we feed random
    # tokens and need none of it, and a machine without `datasets` could not import it. Stand in an empty module.
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


class TorchTitan(System):
    name = "torchtitan"

    def __init__(self, args, seq, device):
        import copy

        from torchtitan.components.loss import build_cross_entropy_loss
        from torchtitan.config import JobConfig as TitanJobConfig
        from torchtitan.distributed import ParallelDims as TitanParallelDims

        titan_qwen3 = _import_torchtitan_qwen3()
        cfg = TitanJobConfig()
        cfg.job.dump_folder = tempfile.mkdtemp(prefix="titan_bench_")
        cfg.training.seq_len = seq
        cfg.compile.enable, cfg.compile.components = True, ["model", "loss"]
        cfg.activation_checkpoint.mode = args.ac
        cfg.activation_checkpoint.selective_ac_option = args.ac_option
        model_args = copy.deepcopy(titan_qwen3.qwen3_args[args.flavor])
        model_args.update_from_config(cfg)
        with torch.device("meta"):
            self.model = titan_qwen3.Qwen3Model(model_args)
        dims = TitanParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
        titan_qwen3.parallelize_qwen3(self.model, dims, cfg)  # one GPU: AC + compile, no FSDP
        self.model.to_empty(device=device)
        self.model.to(torch.bfloat16)  # pure bf16 parameters (the fastest torchtitan setting measured)
        torch.manual_seed(0)
        with torch.no_grad():
            self.model.init_weights(buffer_device=device)  # re-ties embeddings; fp32 RoPE cache
        self.model.train()
        self.loss_fn = build_cross_entropy_loss(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)

    def step(self, inputs, labels):
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.model(inputs)
        loss = self.loss_fn(pred, labels) / labels.numel()
        del pred  # as torchtitan's train step: free the logits before backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        return loss.item()


def build(name, args, seq, device, model_args, hf_weights=None) -> System:
    if name == "ours":
        return Ours(args, seq, device, hf_weights)
    if name == "hf":
        return HF(args, seq, device, model_args)
    return TorchTitan(args, seq, device)


def free(system=None):
    del system
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- measurement
def random_batch(seq, vocab, device, seed=1234):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(system, batch, n, device):
    times, losses = [], []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        losses.append(system.step(*batch))
        sync(device)
        times.append(time.perf_counter() - start)
    return times, losses


def memory_gib(device):
    if device.type != "cuda":
        return float("nan"), float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_speed(args, device, model_args):
    seq, rows = args.seq, []
    batch = random_batch(seq, model_args.vocab_size, device)
    flops = model_args.flops_per_token(args.doc_len or seq)  # attention spans one document
    hf_weights = None
    names = [s for s in SYSTEMS if s in args.systems.split(",")]
    if "hf" in names and "ours" in names:  # same weights for both: first-step losses must agree
        hf_weights = tempfile.mkdtemp(prefix="hf_weights_")
    for name in sorted(names, key=lambda s: s != "hf"):  # hf first, to hand its weights to ours
        try:
            rows += measure(name, args, seq, device, model_args, batch, flops, hf_weights)
        except torch.OutOfMemoryError:
            nan = float("nan")
            rows.append(dict(system=f"{name} OOM", tokens_per_s=nan, mfu=nan, step_ms=nan, spread_ms=nan,
                             alloc=memory_gib(device)[0], reserved=nan, first_loss=nan))
        free()
        torch._dynamo.reset()
    print_table(rows, args, seq, flops)


def measure(name, args, seq, device, model_args, batch, flops, hf_weights) -> list[dict]:
    reset_memory(device)
    system = build(name, args, seq, device, model_args, hf_weights if name == "ours" else None)
    if name == "hf" and hf_weights:
        system.save(hf_weights)
    warm_times, warm_losses = time_steps(system, batch, args.warmup, device)
    times, losses = time_steps(system, batch, args.steps, device)
    alloc, reserved = memory_gib(device)
    rows = [dict(system=name, first_loss=warm_losses[0], first_step_s=warm_times[0], alloc=alloc, reserved=reserved)
            | speed(times, seq, flops)]
    print(f"[{name}] losses {[round(x, 4) for x in warm_losses + losses]}", flush=True)
    if name == "ours":
        for chunk in [int(c) for c in args.loss_chunks.split(",") if c]:
            system.job_config.recipe.loss_chunk_size = chunk
            time_steps(system, batch, 2, device)
            t, _ = time_steps(system, batch, args.steps, device)
            nan = float("nan")
            rows.append(dict(system=f"ours chunk {chunk}", first_loss=nan, alloc=nan, reserved=nan) | speed(t, seq, flops))
        if args.profile:
            profile(system, batch, device, args.profile)
    return rows


def speed(times, seq, flops):
    """Tokens/s of the whole job; MFU per GPU (under torchrun the GPUs share the sequence: cp)."""
    median = statistics.median(times)
    tokens_per_s = seq / median
    n_gpus = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return dict(step_ms=median * 1e3, spread_ms=(max(times) - min(times)) * 1e3, tokens_per_s=tokens_per_s,
                mfu=tokens_per_s * flops / n_gpus / H100_BF16_DENSE_FLOPS)


def print_table(rows, args, seq, flops):
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nQwen3-{args.flavor} seq {seq} batch 1 ac={args.ac} | {device_name} | torch {torch.__version__} | "
          f"{flops / 1e9:.2f} GFLOP/token | median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'system':<18}{'tok/s':>10}{'MFU':>7}{'step ms':>10}{'spread':>8}{'alloc GiB':>11}{'resv GiB':>10}"
          f"{'loss@1':>9}{'1st step s':>11}")
    for r in rows:
        print(f"{r['system']:<18}{r['tokens_per_s']:>10.0f}{r['mfu']:>7.3f}{r['step_ms']:>10.1f}{r['spread_ms']:>8.1f}"
              f"{r['alloc']:>11.2f}{r['reserved']:>10.2f}{r['first_loss']:>9.4f}{r.get('first_step_s', float('nan')):>11.1f}")
    by = {r["system"]: r["tokens_per_s"] for r in rows}
    for other in ("hf", "torchtitan"):
        if "ours" in by and other in by:
            print(f"ours/{other}: {by['ours'] / by[other]:.2f}x")


# ---------------------------------------------------------------- longest sequence
def fits(name, args, seq, device, model_args) -> tuple[bool, float, float]:
    """Build the system at this length and train one step; (ok, peak GiB allocated, step seconds)."""
    system, ok, elapsed = None, False, float("nan")
    reset_memory(device)
    try:
        system = build(name, args, seq, device, model_args)
        batch = random_batch(seq, model_args.vocab_size, device)
        (elapsed,), _ = time_steps(system, batch, 1, device)
        ok = True
    except torch.OutOfMemoryError:
        pass  # the exception (and the frames holding tensors) is dropped on leaving the handler
    alloc, _ = memory_gib(device)
    free(system)
    print(f"[{name}] seq {seq}: {'ok' if ok else 'OOM'} (peak {alloc:.1f} GiB, step {elapsed:.1f} s)", flush=True)
    return ok, alloc, elapsed


def run_max_seq(args, device, model_args):
    torch._dynamo.config.recompile_limit = 64  # every trial is a new shape
    torch._dynamo.config.accumulated_recompile_limit = 4096
    results = {}
    for name in [s for s in SYSTEMS if s in args.systems.split(",")]:
        good, bad, seq = 0, None, args.seq
        while seq <= args.seq_cap:  # double until out of memory (or the cap)
            if not fits(name, args, seq, device, model_args)[0]:
                bad = seq
                break
            good, seq = seq, seq * 2
        while bad is not None and bad - good > args.granularity:  # then bisect
            mid = (good + bad) // 2 // args.granularity * args.granularity
            good, bad = (mid, bad) if fits(name, args, mid, device, model_args)[0] else (good, mid)
        results[name] = (good, bad)
        torch._dynamo.reset()
    print(f"\nlongest trainable sequence, Qwen3-{args.flavor} ac={args.ac} batch 1 | "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} | torch {torch.__version__}")
    for name, (good, bad) in results.items():
        print(f"{name:<12} trains {good or 'nothing tried'}; {'OOM at ' + str(bad) if bad else 'cap ' + str(args.seq_cap) + ' reached'}")


# ---------------------------------------------------------------- where the time goes
KERNEL_GROUPS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("fsdp / copies", ("nccl", "memcpy", "memset", "copy", "chunk_cat", "split_with_sizes")),
    ("fused elementwise (triton)", ("triton",)),
)


# GPU-side ranges that span kernels (counted by their kernels already) and runtime calls.
ANNOTATIONS = ("FSDP::", "Optimizer.", "ProfilerStep", "CompiledFunction", "autograd::", "## ", "cuda")


def profile(system, batch, device, path):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(system, batch, 3, device)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90))
    prof.export_chrome_trace(os.path.splitext(path)[0] + ".trace.json")  # for chrome://tracing or Perfetto
    groups = {}
    for e in events:
        t = getattr(e, "self_device_time_total", 0) or 0
        if t <= 0 or e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith(ANNOTATIONS):
            continue
        name = e.key.lower()
        label = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[label] = groups.get(label, 0) + t
    total = sum(groups.values())
    if not total:
        return
    print(f"\nGPU kernel time by kind over 3 steps (ours; full table in {path}):")
    for label, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<28}{t / 3e3:>9.1f} ms/step {100 * t / total:>6.1f}%")


def probe_attention(device):
    """Forward+backward time of causal GQA SDPA (Qwen3: 16 q heads, 8 kv heads, head_dim 128)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"SDPA causal GQA fwd+bwd, bf16, H=16 KV=8 D=128 | {torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'kernel':<22}{'kv':<9}{'T':>7}{'ms':>9}{'TFLOP/s':>9}")
    for seq in (8192, 32768):
        flops = 3.5 * 2 * 2 * 16 * 128 * seq * seq / 2  # causal: half of QK^T and PV; backward ~2.5x forward
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for gqa in (True, False):
                q = torch.randn(1, 16, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                kv_heads = 8 if gqa else 16
                k, v = (torch.randn(1, kv_heads, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(2))
                label = "enable_gqa" if gqa else "expanded"
                try:
                    def run():
                        with sdpa_kernel([backend]):
                            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                        out.backward(torch.ones_like(out))
                    for _ in range(2):
                        run()
                    sync(device)
                    start, n = time.perf_counter(), 5
                    for _ in range(n):
                        run()
                    sync(device)
                    ms = (time.perf_counter() - start) / n * 1e3
                    print(f"{backend.name:<22}{label:<9}{seq:>7}{ms:>9.2f}{flops / ms / 1e9:>9.0f}", flush=True)
                except RuntimeError as e:
                    print(f"{backend.name:<22}{label:<9}{seq:>7}  unavailable: {str(e).splitlines()[0][:80]}")
                del q, k, v
                free()


def main(argv):
    args = parse_args(argv)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown --systems {sorted(unknown)}; choose from {SYSTEMS}")
    if args.doc_len and args.systems != "ours":
        raise SystemExit(f"--doc-len {args.doc_len} times ours only (the others take no document mask); add --systems ours")
    if args.sdpa:
        from torch.nn.attention import SDPBackend

        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        attention.SDPA_BACKENDS = [names[n] for n in args.sdpa.split(",")]
    # Every system trains on random tokens, so ours never reads its corpus: skip loading it (and
    # the `datasets` import behind it, which a machine may lack).
    recipes.pretrain.load_documents = lambda *args, **kwargs: []
    # One process group for ours (FSDP2 on one GPU); the others ignore it.
    job_config = parse_config(["--job.config_file", args.config, "--model.flavor", args.flavor])
    device = init_distributed(job_config)
    if args.probe_attention:
        probe_attention(device)
        return
    model_args = validate(job_config)[1]
    if args.max_seq:
        run_max_seq(args, device, model_args)
    else:
        run_speed(args, device, model_args)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
