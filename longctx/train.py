"""The training loop: job config -> checks -> mesh -> model -> parallelize -> train loop.

    python train.py --job.config_file train_configs/debug.toml        # the repo's entry point runs main()
    torchrun --nproc_per_node 8 train.py --job.config_file train_configs/debug.toml \
        --parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2 \
        --parallelism.context_parallel_degree 2

Exit codes: 0 done, or stopped by SIGTERM/SIGINT after a checkpoint; 2 a refused input (one
`error:` line); 3 a step whose loss or grad norm was not finite (nothing of it applied or saved).
"""

import contextlib
import gc
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longctx.base import IGNORE_INDEX, log
from longctx.checkpoint.manager import Checkpointer
from longctx.checkpoint.source import weight_source
from longctx.config import JobConfig, parse_config
from longctx.data.balance import DocumentCost
from longctx.data.loader import RowSchedule, StepLoader
from longctx.launch import Job, distributed, run_command, validate
from longctx.metrics import MetricsLogger
from longctx.modeling import build_model
from longctx.optim import build_lr_schedule, build_optimizer, clip_grad_norm_
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.parallelisms.settings import forward_context, loss_context
from longctx.profiling import profilers
from longctx.validation import Validator


class NonFiniteError(RuntimeError):
    """A step whose loss or grad norm is NaN or inf, past training.skip_nonfinite_steps: exit code 3."""


@dataclass
class StepResult:
    """What train_step leaves on the device (read on log steps only) and what every rank agreed on."""

    loss: torch.Tensor  # the global batch's mean token loss
    grad_norm: torch.Tensor  # before clipping
    n_tokens: torch.Tensor  # the global batch's labelled tokens
    metric_sums: dict[str, torch.Tensor]  # the recipe's per-token sums on this rank
    nonfinite: str | None  # "loss" or "grad_norm" when the step was not applied
    stop: bool  # some rank received SIGTERM/SIGINT


class StopSignals:
    """SIGTERM and SIGINT (Slurm preemption, Ctrl-C, torchrun forwarding either) only raise a flag:
    the step in flight finishes, the ranks agree at its sync, and the loop saves and stops. A second
    signal does not abort either (torchrun answers Ctrl-C with a SIGTERM of its own): SIGKILL does."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class ScheduledGC:
    """Python's automatic collections would pause the host at whatever step crosses its allocation
    threshold, and a full one walks every object of the model, its hooks and compiled graphs. As in
    torchtitan, they are off during the loop and a young-generation collection runs every
    training.gc_freq steps instead."""

    def __init__(self, freq: int):
        self.freq = freq

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.disable()
        gc.collect(1)
        return self

    def step(self, step: int) -> None:
        if step % self.freq == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self.was_enabled:
            gc.enable()


def token_means(metric_sums: dict[str, torch.Tensor], n_tokens: torch.Tensor, group) -> dict[str, float]:
    """A recipe's per-token metric sums on this rank -> means over the global batch's labelled tokens."""
    if not metric_sums:
        return {}
    sums = torch.stack(list(metric_sums.values())).float()
    dist.all_reduce(sums, group=group)
    return dict(zip(metric_sums, (sums / n_tokens.clamp(min=1)).tolist()))


def on_device(microbatches: list[dict], parallel_dims: ParallelDims, device) -> list[dict]:
    """This rank's micro-batches on the device, cut into its cp chunk. On CUDA through pinned memory
    and without blocking: a pageable copy would make the host wait for the previous step's kernels."""
    pin = device.type == "cuda"
    return [parallel_dims.shard_for_cp({k: (v.pin_memory() if pin and not v.is_cuda else v).to(device, non_blocking=pin)
                                        for k, v in mb.items()}) for mb in microbatches]


def labelled_tokens(microbatches: list[dict]) -> torch.Tensor:
    return sum((mb["labels"] != IGNORE_INDEX).sum() for mb in microbatches).float()


def train_step(model, job: Job, microbatches, optimizer, lr_schedule, job_config, device,
               checkpointer: Checkpointer | None = None, stop_requested: bool = False) -> StepResult:
    """One optimizer step over this rank's micro-batches, applied only if the global batch's loss and
    grad norm are finite (otherwise its gradients are dropped by the next zero_grad)."""
    recipe, parallel_dims, settings = job.recipe, job.parallel_dims, job.settings
    dp_cp = parallel_dims.mesh("dp_cp").get_group()
    optimizer.zero_grad()  # here, not after the step: the last step's gradients stay inspectable
    microbatches = on_device(microbatches, parallel_dims, device)
    # Normalize by the GLOBAL count of labelled tokens (all micro-batches, dp and cp ranks), so
    # every layout computes the same mean loss and the same gradient as one process.
    n_tokens = labelled_tokens(microbatches)
    dist.all_reduce(n_tokens, group=dp_cp)
    total = torch.zeros((), device=device)
    metric_sums = {}
    for mb in microbatches:
        with loss_context(settings):  # forward and backward
            with forward_context(settings, device.type):
                loss_sum, recipe_sums = recipe.loss_sum(model, mb, settings.loss_chunk)
            loss = loss_sum / n_tokens.clamp(min=1)
            loss.backward()
        total += loss.detach()
        for name, value in recipe_sums.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach()
    grad_norm = clip_grad_norm_(list(model.parameters()), job_config.training.max_norm)
    dist.all_reduce(total, group=dp_cp)  # tp ranks already hold the same value
    flags = step_flags(total, grad_norm, stop_requested)
    if checkpointer is not None:
        checkpointer.maybe_wait_for_staging()  # an async_with_pinned_mem save may still be copying the weights
    # A fused optimizer skips a non-finite step on the device (found_inf), so it is queued before
    # the host reads the flags and the device never waits for the host between backward and the
    # update. The others step only once the host has read them.
    stepped_on_device = skips_on_device(optimizer)
    if stepped_on_device:
        optimizer.found_inf = flags[:2].amax()  # 1.0: the kernel leaves weights, moments and step counts as they were
        optimizer.step()
    bad_loss, bad_grad_norm, stop = flags.tolist()  # the step's one host sync
    nonfinite = "loss" if bad_loss else "grad_norm" if bad_grad_norm else None
    if nonfinite is None:
        if not stepped_on_device:
            optimizer.step()
        lr_schedule.step()
    return StepResult(total, grad_norm, n_tokens, metric_sums, nonfinite, bool(stop))


def step_flags(loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool) -> torch.Tensor:
    """[loss not finite, grad norm not finite, some rank asked to stop] as 0/1 floats, max-reduced
    over all ranks so that every rank takes the same branch; left on the device."""
    flags = torch.stack([~loss.isfinite(), ~grad_norm.to(loss.device).isfinite(),
                         torch.full((), stop_requested, device=loss.device)]).float()  # torch.full: no host->device copy
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer honours found_inf (torch's fused Adam and AdamW do; foreach and
    for-loop refuse it)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


@torch.no_grad()
def validation_loss(model, validator: Validator, job: Job, device) -> float:
    """The held-out loss: token losses summed over every validation batch and rank, divided by their
    global labelled-token count (as train_step normalizes)."""
    parallel_dims, settings = job.parallel_dims, job.settings
    sums = torch.zeros(2, device=device)  # loss sum, labelled tokens
    model.eval()
    for microbatches in validator.batches():
        for mb in on_device(microbatches, parallel_dims, device):
            with loss_context(settings), forward_context(settings, device.type):
                loss_sum, _ = validator.recipe.loss_sum(model, mb, settings.loss_chunk)
            sums += torch.stack([loss_sum.detach().float(), labelled_tokens([mb])])
    model.train()
    dist.all_reduce(sums, group=parallel_dims.mesh("dp_cp").get_group())  # tp ranks hold the same sums
    loss_sum, n_tokens = sums.tolist()
    return loss_sum / max(n_tokens, 1)


def skip_or_stop(result: StepResult, step: int, lr_schedule, allowed: int) -> dict:
    """A non-finite step: one line while training.skip_nonfinite_steps allows it, else NonFiniteError.
    Returns the skip count to log (when skipping is allowed at all)."""
    # The LR schedule advances once per applied step, so the count needs no state of its own and
    # resumes with the schedule's.
    skipped = step - lr_schedule.last_epoch
    if result.nonfinite is not None:
        value = getattr(result, result.nonfinite).item()
        if skipped > allowed:
            raise NonFiniteError(
                f"step {step}: {result.nonfinite} is {value}; the step was not applied nor saved and the run stops "
                f"(training.skip_nonfinite_steps={allowed}); lower optimizer.lr or check the data, then resume from the last checkpoint")
        log(f"step {step}: {result.nonfinite} is {value}; batch skipped, weights unchanged "
            f"({skipped} of training.skip_nonfinite_steps={allowed})")
    return {"skipped_steps": skipped} if allowed else {}


def log_step(metrics: MetricsLogger, step: int, result: StepResult, lr_schedule, parallel_dims: ParallelDims,
             **extra) -> dict:
    """A log step: the only place the step's values are read from the device."""
    loss, grad_norm, n_tokens = torch.stack([result.loss, result.grad_norm.to(result.loss.device), result.n_tokens]).tolist()
    recipe_metrics = token_means(result.metric_sums, result.n_tokens, parallel_dims.mesh("dp_cp").get_group())
    return metrics.log(step, loss, grad_norm, lr_schedule.get_last_lr()[0],
                       valid_tokens=int(n_tokens), **recipe_metrics, **extra)


def train(job_config: JobConfig, job: Job, device, signals: "StopSignals | None" = None):
    """Build model, optimizer, schedule and data; run the loop. Returns (model, logged records).
    Needs an initialized process group; leaves it alive (tests run several layouts in one group).
    `signals`: SIGTERM/SIGINT caught since the command started (default: from the loop's start)."""
    spec, model_args, parallel_dims, recipe, settings = job.spec, job.model_args, job.parallel_dims, job.recipe, job.settings
    training = job_config.training
    schedule = RowSchedule.from_training(training, parallel_dims.seq_multiple)  # the one owner of row length
    log(f"{spec.name} {job_config.model.flavor}: {model_args.num_params() / 1e6:.1f}M params; "
        f"dp_replicate={parallel_dims.dp_replicate} dp_shard={parallel_dims.dp_shard} cp={parallel_dims.cp} tp={parallel_dims.tp}; "
        f"{settings.describe()}")
    source = weight_source(job_config)  # decided once: the run's own step, an initial load or a seed
    model = build_model(spec, model_args, parallel_dims, settings, device, source)
    optimizer = build_optimizer(model, job_config.optimizer)
    lr_schedule = build_lr_schedule(optimizer, job_config.lr_scheduler, training.steps)

    global_batch = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * parallel_dims.dp
    # Rows dealt by their documents' modelled flops (data/balance.py), from the model's own count.
    balance = DocumentCost.from_flops_per_token(model_args.flops_per_token) if training.balance == "flops" else None
    loader = StepLoader(recipe.build_stream(), schedule, training.local_batch_size, global_batch,
                        parallel_dims.dp, parallel_dims.mesh("dp").get_local_rank(), balance=balance)
    checkpointer = Checkpointer(job_config, model, optimizer, lr_schedule, loader, spec, model_args, source)
    start = checkpointer.resume()  # the last step the run's own checkpoint holds; 0 on a fresh start
    if start >= training.steps:
        log(f"the run's checkpoint is at step {start} and training.steps={training.steps}: nothing left to train; "
            "raise training.steps to continue")
    metrics = MetricsLogger(job_config, device, model_args, training.steps, dist.get_rank(), start)
    validator = Validator(job_config, parallel_dims, job.held_out) if job.held_out is not None else None
    records = []
    try:
        stops = contextlib.nullcontext(signals) if signals is not None else StopSignals()
        with stops as signals, profilers(job_config, start) as profiler, ScheduledGC(training.gc_freq) as collector:
            for step in range(start + 1, training.steps + 1):
                batch = loader.next_step(step)  # this step's rows, at its stage of the schedule
                metrics.add_step(global_batch * batch.row.padded, batch.row.padded)
                result = train_step(model, job, batch.microbatches, optimizer, lr_schedule, job_config, device,
                                    checkpointer, stop_requested=signals.received is not None)
                extra = skip_or_stop(result, step, lr_schedule, training.skip_nonfinite_steps)
                if validator is not None and validator.due(step):
                    with metrics.untimed():
                        extra["validation_loss"] = validation_loss(model, validator, job, device)
                if "validation_loss" in extra or result.stop or step % job_config.metrics.log_freq == 0 or step in (1, training.steps):
                    records.append(log_step(metrics, step, result, lr_schedule, parallel_dims, **extra))
                checkpointer.save(step, last_step=step == training.steps, now=result.stop)
                profiler.step()
                collector.step(step)
                if result.stop:
                    log(stop_line(signals.received, step, job_config))
                    break
    finally:
        loader.close()
        metrics.close()
        checkpointer.close()
    return model, records


def stop_line(received: str | None, step: int, job_config: JobConfig) -> str:
    ckpt = job_config.checkpoint
    saved = (f"checkpoint {job_config.job.dump_folder}/{ckpt.folder}/step-{step} saved; the same command resumes from it"
             if ckpt.enable and not ckpt.load_only else "checkpointing is off: nothing saved")
    return f"stopped by {received or 'a signal to another rank'} after step {step} of {job_config.training.steps}: {saved}"


def main(argv: list[str]) -> int:
    # Signals are caught from the start: a preemption during start-up stops the run after its first step.
    with StopSignals() as signals:
        job_config = parse_config(argv)
        job = validate(job_config)
        if job_config.debug.deterministic:
            # cuBLAS repeats its results only with a fixed workspace, read before its first call.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=job_config.debug.deterministic_warn_only)
        try:
            with distributed(job_config) as device:
                train(job_config, job, device, signals)
        except NonFiniteError as e:
            if dist.get_rank() == 0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            return 3
    return 0


if __name__ == "__main__":
    run_command(main)
