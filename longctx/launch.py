"""What every command does before and after its work: the checks before any process group, the
process group itself, and an exit code that tells the truth on every rank.

    validate(job_config) -> Job        everything refusable, before any process group
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

from longctx import profiling, validation
from longctx.base import ConfigError, DataError, UserError, global_rank
from longctx.config import JobConfig
from longctx.modeling import model_spec_and_args
from longctx.models.common.args import DecoderArgs
from longctx.models.common.spec import ModelSpec
from longctx.parallelisms.activation_checkpoint import blocks_to_checkpoint
from longctx.parallelisms.parallel_dims import ParallelDims
from longctx.recipes import Recipe, build_recipe


class Job(NamedTuple):
    """What a job config decides, checked: the model family and dimensions, the layout on this
    many processes, and the recipe with its data opened (and the held-out one, with validation)."""

    spec: ModelSpec
    model_args: DecoderArgs
    parallel_dims: ParallelDims
    recipe: Recipe
    held_out: Recipe | None = None  # validation.dataset_path through the same recipe; None without validation


def validate(job_config: JobConfig) -> Job:
    """Everything that can be refused before a process group exists: config, layout, heads, data.
    Each refusal is a UserError naming the key or file."""
    spec, model_args = model_spec_and_args(job_config)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel_dims = ParallelDims.from_config(job_config.parallelism, world_size, model_args.n_heads, model_args.n_kv_heads)
    check_seq_len_schedule(job_config.training, job_config.compile.enable)
    ac = job_config.activation_checkpoint
    blocks_to_checkpoint(ac.mode, ac.selective_ac_option, model_args.n_layers)  # refuses a bad mode or option
    if ac.cpu_offload and ac.mode == "none":
        raise ConfigError("activation_checkpoint.cpu_offload parks checkpointed block inputs; "
                          "set activation_checkpoint.mode full or selective")
    if ac.mlp_chunk_size < 0 or (ac.mlp_chunk_size and parallel_dims.tp > 1):
        raise ConfigError(f"activation_checkpoint.mlp_chunk_size={ac.mlp_chunk_size}: give 0 (off) or a positive number of "
                          f"tokens, and 0 under tensor parallel (which already splits the MLP's hidden_dim by tp)")
    if job_config.training.skip_nonfinite_steps < 0:
        raise ConfigError(f"training.skip_nonfinite_steps={job_config.training.skip_nonfinite_steps} must be >= 0")
    validation.check(job_config)
    profiling.check(job_config)
    profiling.check_folders(job_config)
    recipe = build_recipe(job_config)
    check_recipe(recipe, model_args.vocab_size, ("training.seq_len", job_config.training.seq_len))
    held_out = None
    if job_config.validation.enable:  # held-out data is read and checked exactly as training data
        held_out = build_recipe(job_config, "validation")
        check_recipe(held_out, model_args.vocab_size, validation.held_out_rows(job_config)[0])
    return Job(spec, model_args, parallel_dims, recipe, held_out)


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


def check_seq_len_schedule(training, compiled: bool) -> None:
    """training.seq_len_schedule: [step, seq_len] pairs from step 0 on, ending at training.seq_len's length."""
    schedule = training.seq_len_schedule
    if schedule is None:
        return
    shown = f"training.seq_len_schedule={[list(stage) for stage in schedule]}"
    if not schedule or any(len(stage) != 2 for stage in schedule):
        raise ConfigError(f"{shown} must be a list of [step, seq_len] pairs, e.g. [[0, 32768], [2000, 65536]]")
    starts, lengths = [stage[0] for stage in schedule], [stage[1] for stage in schedule]
    if starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"{shown}: steps must start at 0 and increase")
    if min(lengths) <= 0 or max(lengths) != training.seq_len:
        raise ConfigError(f"{shown}: lengths must be positive and the largest must equal training.seq_len={training.seq_len}")
    # Each stage compiles each block once at its own static shapes (parallelisms/compile.py); past
    # dynamo's recompile limit a block would silently fall back to eager.
    limit = torch._dynamo.config.recompile_limit
    if compiled and len(schedule) > limit:
        raise ConfigError(f"{shown} has {len(schedule)} stages, more than torch.compile recompiles ({limit}); use fewer stages")


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
