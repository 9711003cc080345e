"""[profiling]: torch.profiler traces and CUDA memory snapshots, every `profile_freq` steps.

Traces go to {dump_folder}/{save_traces_folder}/iteration_N/rank{R}_trace.json (torchtitan's
layout; open them in Perfetto or chrome://tracing). Each cycle of profile_freq steps waits, warms
up for profiler_warmup steps and records profiler_active steps. Memory snapshots are torchtitan's
maybe_enable_memory_snapshot ({save_memory_snapshot_folder}/iteration_N/rank{R}_memory_snapshot.pickle,
for pytorch.org/memory_viz). The trace profiler is our own: torchtitan 0.2.2's
maybe_enable_profiling hands torch.profiler a `None` activity without a GPU, a TypeError on CPU.
"""

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torchtitan.tools.profiling import maybe_enable_memory_snapshot

from longctx.base import ConfigError
from longctx.config import JobConfig


def check(job_config: JobConfig) -> None:
    """Before any process group: one ConfigError line per bad value."""
    p = job_config.profiling
    if not (p.enable_profiling or p.enable_memory_snapshot):
        return
    if p.profile_freq < 1:
        raise ConfigError(f"profiling.profile_freq={p.profile_freq} must be >= 1")
    if p.enable_profiling and (p.profiler_active < 1 or p.profiler_warmup < 0
                               or p.profiler_warmup + p.profiler_active > p.profile_freq):
        raise ConfigError(f"profiling: profiler_warmup={p.profiler_warmup} + profiler_active={p.profiler_active} must fit "
                          f"in profile_freq={p.profile_freq} steps (active >= 1, warmup >= 0)")
    if p.enable_memory_snapshot and not torch.cuda.is_available():
        raise ConfigError("profiling.enable_memory_snapshot records the CUDA caching allocator; this machine has no CUDA device")


def check_folders(job_config: JobConfig) -> None:
    """Before step 1: a trace or snapshot folder under job.dump_folder that exists as a file (or
    under one) would fail at the first save, steps into the run."""
    p = job_config.profiling
    for enabled, key in ((p.enable_profiling, "save_traces_folder"), (p.enable_memory_snapshot, "save_memory_snapshot_folder")):
        folder = os.path.abspath(os.path.join(job_config.job.dump_folder, getattr(p, key)))
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if enabled and not os.path.isdir(existing):
            raise ConfigError(f"profiling.{key}={getattr(p, key)!r}: {existing} is a file, where {folder} must be a folder; "
                              "move the file or choose another folder")


class Profilers:
    """What the loop steps once per training step: the trace profiler and the memory snapshotter (either may be None)."""

    def __init__(self, traces, memory):
        self.traces, self.memory = traces, memory

    def step(self) -> None:
        for profiler in (self.traces, self.memory):
            if profiler is not None:
                profiler.step()


@contextlib.contextmanager
def profilers(job_config: JobConfig, start_step: int):
    """Profilers for the steps after start_step (a resumed run counts on from its checkpoint)."""
    config, rank, folder = job_config.profiling, dist.get_rank(), job_config.job.dump_folder
    if rank != 0 and not config.all_ranks:
        config = dataclasses.replace(config, enable_profiling=False, enable_memory_snapshot=False)
    with (_traces(config, folder, start_step, rank) as traces,
          maybe_enable_memory_snapshot(config, global_step=start_step, base_folder=folder) as memory):
        yield Profilers(traces, memory)


@contextlib.contextmanager
def _traces(config, dump_folder: str, start_step: int, rank: int):
    if not config.enable_profiling:
        yield None
        return

    def save(profiler) -> None:
        folder = os.path.join(dump_folder, config.save_traces_folder, f"iteration_{profiler.step_num}")
        os.makedirs(folder, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    wait = config.profile_freq - config.profiler_warmup - config.profiler_active
    schedule = torch.profiler.schedule(wait=wait, warmup=config.profiler_warmup, active=config.profiler_active)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save, record_shapes=True) as profiler:
        profiler.step_num = start_step  # the schedule and folder names count training steps
        yield profiler
