"""What every command does before and after its work: the checks before any process group, the
process group itself, and an exit code that tells the truth on every rank.

    validate(job_config) -> Job        what needs the model or the data, before any process group
    init_distributed(job_config)       NCCL on GPUs, gloo on CPU, a 1-process group for plain python
    run_command(main)                  exit 0 done, 2 a refused input (one `error:` line), 1 a bug
                                       (its traceback), or main's own code (train.py: 3, a non-finite step)
"""

import contextlib
import os
import socket
import sys
import traceback
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from longctx.base import ConfigError, DataError, UserError, global_rank
from longctx.config import JobConfig
from longctx.modeling import model_spec_and_args
from longctx.models.common.args import DecoderArgs
from longctx.models.common.spec import ModelSpec
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.recipes import Recipe, build_recipe


class Job(NamedTuple):
    """What a job config decides, checked: the model family and dimensions, the layout on this
    many processes, and the recipe with its data opened."""

    spec: ModelSpec
    model_args: DecoderArgs
    parallel_dims: ParallelDims
    recipe: Recipe


def validate(job_config: JobConfig) -> Job:
    """Everything that can be refused before a process group exists and needs the model or the data
    (config values alone are parse_config's VALUE_RULES): family and flavor, layout against the
    heads, tokenizer and data. Each refusal is a UserError naming the key or file."""
    spec, model_args = model_spec_and_args(job_config)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel_dims = ParallelDims.from_config(job_config.parallelism, world_size, model_args.n_heads, model_args.n_kv_heads)
    recipe = build_recipe(job_config)
    if recipe.vocab_size > model_args.vocab_size:
        raise ConfigError(f"tokenizer vocab {recipe.vocab_size} exceeds the model's vocab_size {model_args.vocab_size}")
    # Token ids given as numbers in the data (policy rollouts); out of range, one would be a
    # device-side assert at the step that reaches it.
    largest_id, where = getattr(recipe, "largest_token_id", (-1, ""))
    if largest_id >= model_args.vocab_size:
        raise DataError(f"{where}: token id {largest_id} >= the model's vocab_size {model_args.vocab_size}; "
                        "the rollouts were tokenized for another model")
    return Job(spec, model_args, parallel_dims, recipe)


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
