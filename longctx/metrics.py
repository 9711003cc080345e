"""Per-step metrics: a console line, <dump_folder>/metrics.jsonl, and TensorBoard (one scalar per
record key, tagged with the key, in <dump_folder>/<metrics.save_tb_folder>)."""

import contextlib
import json
import os
import resource
import time

import torch
from torch.utils.tensorboard import SummaryWriter

# Dense bf16 tensor-core peaks (no 2:4 sparsity), from NVIDIA's datasheets; the first entry
# whose words all appear in torch.cuda.get_device_name wins, so the specific names come first.
PEAK_BF16_DENSE_FLOPS = (
    (("H100", "NVL"), 835e12),
    (("H100", "PCIe"), 756e12),
    (("H100",), 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835e12),
    (("H200",), 989.4e12),  # SXM: the H100 SXM's compute with more memory
    (("GH200",), 989.4e12),
    (("A100",), 312e12),
    (("B200",), 2250e12),
    (("B100",), 1750e12),
)


def peak_flops_for(device_name: str) -> float:
    """Dense bf16 peak of a CUDA device by its name; 0 when unknown (mfu is then reported as 0,
    not against another card's peak)."""
    for words, flops in PEAK_BF16_DENSE_FLOPS:
        if all(w in device_name for w in words):
            return flops
    return 0.0


def peak_flops(device: torch.device) -> float:
    return peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0


def mfu(tokens_per_s_per_device: float, flops_per_token: int, peak: float) -> float:
    """Model flops utilization: the model's flops per second against the device's peak."""
    return tokens_per_s_per_device * flops_per_token / peak if peak else 0.0


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _reopen(path: str, start_step: int):
    """metrics.jsonl for appending, without the records past start_step: those belong to steps the
    resumed run does again (it saved no checkpoint there), so no step is ever logged twice."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line.rstrip("\n") + "\n" for line in f if (step := _step_of(line)) is not None and step <= start_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)  # atomic: a kill here leaves the old file or the new one
    return open(path, "a")


def _step_of(line: str) -> int | None:
    """A record's step; None for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLogger:
    """Only rank 0 writes. `log` takes the step's numbers and derives throughput, MFU and memory."""

    def __init__(self, job_config, device: torch.device, model_args, total_steps: int, rank: int, start_step: int = 0):
        """start_step: the step the run resumes after; metrics.jsonl keeps only the records up to it."""
        self.device, self.model_args, self.total_steps = device, model_args, total_steps
        self.enabled = rank == 0
        self.peak = peak_flops(device)
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.start = self.last = time.perf_counter()
        self.first_step = None
        self.tokens = self.flops = self.causal_flops = 0  # since the last log line
        self.jsonl = self.tensorboard = None
        if self.enabled:
            folder = job_config.job.dump_folder
            os.makedirs(folder, exist_ok=True)
            self.jsonl = _reopen(os.path.join(folder, "metrics.jsonl"), start_step)
            if job_config.metrics.enable_tensorboard:
                self.tensorboard = SummaryWriter(os.path.join(folder, job_config.metrics.save_tb_folder), max_queue=1000)

    def add_step(self, tokens: int, row_len: int) -> None:
        """Every step: the tokens the whole job processes (all dp ranks, padding included) in rows of
        row_len. Flops per token grow with the row, so a staged run counts each stage at its length."""
        self.tokens += tokens
        self.flops += tokens * self.model_args.flops_per_token(row_len)
        self.causal_flops += tokens * self.model_args.flops_per_token(row_len, causal=True)

    def log(self, step: int, loss: float, grad_norm: float, lr: float, **extra) -> dict:
        """Rates are over the steps added since the last log line."""
        now = time.perf_counter()
        if self.first_step is None:  # first log: time since the loop began
            self.first_step = step - 1
        elapsed, self.last = now - self.last, now
        tokens_per_s, per_device = self.tokens / elapsed, self.tokens / elapsed / self.world_size
        flops_per_token, causal_per_token = self.flops / max(self.tokens, 1), self.causal_flops / max(self.tokens, 1)
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "tflops": per_device * flops_per_token / 1e12,
            "mfu": mfu(per_device, flops_per_token, self.peak),
            "mfu_causal": mfu(per_device, causal_per_token, self.peak),
            "memory_gib": peak_memory_gib(self.device),
            **extra,
        }
        self.tokens = self.flops = self.causal_flops = 0
        if self.enabled:
            eta = (now - self.start) / (step - self.first_step) * (self.total_steps - step)
            print(
                f"step {step:>5}/{self.total_steps}  loss {loss:8.4f}  grad_norm {grad_norm:8.4f}  lr {lr:.2e}  "
                f"tok/s {tokens_per_s:9.0f}  mfu {record['mfu']:6.2%}  mem {record['memory_gib']:6.2f} GiB  eta {eta:5.0f}s"
                + "".join(f"  {k} {v:.4g}" for k, v in extra.items()),
                flush=True,
            )
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key != "step":
                        self.tensorboard.add_scalar(key, value, step)
        return record

    @contextlib.contextmanager
    def untimed(self):
        """Time spent inside (held-out evaluation) is not training: tokens/s and MFU leave it out."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.last += time.perf_counter() - begin

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
