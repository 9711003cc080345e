"""[profiling]: torch.profiler traces and CUDA memory snapshots, every `profile_freq` steps.

Traces go to {dump_folder}/{save_traces_folder}/iteration_N/rank{R}_trace.json (torchtitan's
layout; open them in Perfetto or chrome://tracing). Each cycle of profile_freq steps waits, warms
up for profiler_warmup steps and records profiler_active steps. Memory snapshots (the CUDA caching
allocator's history) go to {save_memory_snapshot_folder}/iteration_N/rank{R}_memory_snapshot.pickle
every profile_freq steps, and to iteration_N_exit/ when step N+1 runs out of memory (torchtitan's
layout; open them in pytorch.org/memory_viz).
"""

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist

from longctx.base import log
from longctx.config import JobConfig


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
    with _traces(config, folder, start_step, rank) as traces, _memory(config, folder, start_step, rank) as memory:
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


# Each entry of the allocator's history costs a few KB of host memory; torchtitan's bound.
MEMORY_HISTORY_ENTRIES = 100_000


class MemorySnapshots:
    """Records the CUDA caching allocator's history and dumps it every `freq` training steps."""

    def __init__(self, folder: str, freq: int, start_step: int, rank: int):
        self.folder, self.freq, self.step_num, self.rank = folder, freq, start_step, rank

    def step(self) -> None:
        self.step_num += 1
        if self.step_num % self.freq == 0:
            self.dump(f"iteration_{self.step_num}")

    def dump(self, name: str) -> None:
        folder = os.path.join(self.folder, name)
        os.makedirs(folder, exist_ok=True)
        torch.cuda.memory._dump_snapshot(os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle"))


@contextlib.contextmanager
def _memory(config, dump_folder: str, start_step: int, rank: int):
    if not config.enable_memory_snapshot:
        yield None
        return
    snapshots = MemorySnapshots(os.path.join(dump_folder, config.save_memory_snapshot_folder), config.profile_freq,
                                start_step, rank)
    log(f"memory snapshots every {config.profile_freq} steps in {snapshots.folder}")
    torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
    try:
        yield snapshots
    except torch.OutOfMemoryError:
        snapshots.dump(f"iteration_{snapshots.step_num}_exit")  # the last step done; the next one ran out
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)  # stop recording
