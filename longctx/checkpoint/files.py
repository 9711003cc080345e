"""Files of checkpoints and exports: the atomic folder write, the refusal to replace an output, DCP
reads whose failures a user can cause turned into one line, and the check of a checkpoint's tensors
against the model."""

import contextlib
import os
import pickle
import shutil

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from longctx.base import CheckpointError, barrier, global_rank

# What reading a missing, cut-short or garbled file raises: the OS's errors, those the pickle
# module documents for a bad stream (UnpicklingError, EOFError, AttributeError, ImportError,
# IndexError) and ValueError (an unknown pickle protocol). Only around a single read of one file.
UNREADABLE = (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError)
# What a rank's failure inside dcp.load is when the files, not the code, are at fault: a file gone
# or cut short since it was checked, a garbled pickle, a safetensors file damaged inside, a tensor
# whose saved size differs from the model's (DCP's ValueError). AttributeError and the like are
# left out here: inside DCP's machinery they are bugs.
USER_CAUSED = (OSError, EOFError, pickle.UnpicklingError, ValueError, SafetensorError)


def refuse_existing(path: str) -> None:
    """Conversions never replace what a user already has."""
    if os.path.exists(path):
        raise CheckpointError(f"{path} already exists; remove it or choose another output folder")


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yields `path.partial` for the ranks to write into, then renames it to `path` (replacing an
    older one): `path` exists only once complete, whenever the job is killed. Collective."""
    partial = path.rstrip("/") + ".partial"
    if global_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a killed earlier attempt
        os.makedirs(partial)
    barrier()
    yield partial
    barrier()  # every rank's files are written
    if global_rank() == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(partial, path)
    barrier()


def dcp_error_line(error: BaseException) -> str:
    """DCP wraps every rank's traceback into one exception; keep its last meaningful line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(error).__name__)[:300]


def load_checkpoint(state: dict, path: str, storage_reader=None) -> None:
    """dcp.load(state) from the folder `path` (read by `storage_reader` if given). When every failing
    rank failed on the files (USER_CAUSED), one CheckpointError line naming `path`, the cause chained;
    anything else (a bug, out of memory, a collective that failed) propagates with its traceback."""
    try:
        dcp.load(state, checkpoint_id=None if storage_reader else path, storage_reader=storage_reader)
    except CheckpointException as e:  # a BaseException: one per call, carrying every rank's failure
        failures = [error for error, _ in e.failures.values()]
        if failures and all(isinstance(error, USER_CAUSED) for error in failures):
            raise CheckpointError(f"cannot load {path}: {dcp_error_line(e)}") from e
        raise


def _brief(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


# Floating dtypes are converted on load (Qwen ships bf16; training keeps fp32 weights); anything
# else is a quantized checkpoint whose values would be silently wrong after a cast.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", torch.float64, torch.float32, torch.float16, torch.bfloat16}


def check_tensors(path: str, found: dict, expected: dict[str, tuple], hint: str) -> None:
    """found: name -> (shape, dtype) in the checkpoint; expected: name -> shape of the model.
    Missing, unexpected, mis-shaped and non-float tensors are refused before any weight is read."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{path}: missing keys {_brief(missing)} ({hint})")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {_brief(unexpected)} ({hint})")
    wrong = [f"{n} {found[n][0]} vs model {expected[n]}" for n in sorted(expected) if found[n][0] != expected[n]]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch: {'; '.join(wrong[:3])} ({hint})")
    bad = [f"{n} is {found[n][1]}" for n in sorted(found) if found[n][1] not in _FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{path}: dtype mismatch: {'; '.join(bad[:3])}; only float checkpoints load (dequantize first)")
