"""Run a function on N ranks in fresh processes and return rank 0's result: CPU ranks over gloo,
or one GPU per rank over NCCL.

One process group serves every case passed to it, so an N-rank test pays process start-up and
import time once. A short gloo timeout makes a failure on one rank fail the test instead of
hanging CI for gloo's default 30 minutes."""

import os
import pickle
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longctx.launch import free_port

TIMEOUT = timedelta(seconds=90)

# CPU ranks fork from one server process that imported these once per pytest run, instead of each
# importing them afresh (4-6 s of CPU apiece, 8 ranks on CI's 2 cores). Importing starts no thread
# and touches no device, so the fork is safe. A rank sees the environment of the server's start,
# not the test's: what a rank needs goes in as an argument.
mp.set_forkserver_preload(["longctx.train", "longctx.launch", "transformers", "tests.conftest", "tests.distributed_harness"])


def _worker(rank: int, world_size: int, use_gpus: bool, port: int, out_path: str, fn, args) -> None:
    if not use_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call: the run is CPU-only
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    backend = "gloo"
    if use_gpus:
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        result = fn(*args)
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(result, f)
        dist.barrier()  # no rank closes its connections while a peer still works
    finally:
        dist.destroy_process_group()
    # Process groups that a DeviceMesh still holds die at interpreter teardown, and a gloo worker
    # thread torn down there can abort the process (SIGABRT, "terminate called without an active
    # exception", seen once in CI after a passing case). The result is written: skip teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(world_size: int, fn, *args, use_gpus: bool = False):
    """fn(*args) on every rank; fn must be a module-level function (it is pickled by name).
    use_gpus: one GPU per rank over NCCL; otherwise CPU over gloo, GPUs hidden."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pkl")
        mp.start_processes(
            _worker, args=(world_size, use_gpus, free_port(), out_path, fn, args),
            nprocs=world_size, start_method="spawn" if use_gpus else "forkserver",
        )
        with open(out_path, "rb") as f:
            return pickle.load(f)
