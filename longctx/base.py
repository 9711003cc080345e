"""The floor every layer stands on: the user-error classes, the rank-0 log line, and the constants
and small helpers several layers share. It imports nothing of the package (docs/design.md, "Layers").

A UserError is a refusal of the user's input: the command prints its message as one `error:` line
and exits with code 2 (launch.run_command). Any other exception is a bug and keeps its traceback.
"""

import os

import torch.distributed as dist

# The label of a position that carries no loss: padding, prompts, a document's last token.
IGNORE_INDEX = -100

# The longest row: RoPE angles are fp32 position x frequency (models/common/rope.py), and fp32
# holds every integer position exactly only up to 2**24 (16.8M, 16x the longest context this repo
# targets); beyond it neighbouring tokens would share a position.
MAX_SEQ_LEN = 2**24


class UserError(Exception):
    """Input the user must change; the message is the one line shown, naming the key, flag or file."""


class ConfigError(UserError):
    """A bad config key, value or command-line flag."""


class DataError(UserError):
    """Unreadable, missing or malformed data or tokenizer files."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked (missing, damaged or mismatched files)."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_greedy(sizes: list[float], capacity: float) -> list[list[int]]:
    """Indices of `sizes`, in order, grouped greedily: a group closes when the next item would
    overflow it; an item larger than capacity gets a group of its own."""
    groups, used = [[]], 0
    for index, size in enumerate(sizes):
        if groups[-1] and used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


def global_rank() -> int:
    """This process's rank: the process group's, else RANK from the environment (0 outside torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(message: str) -> None:
    """Rank 0 says it (every rank runs the same program)."""
    if global_rank() == 0:
        print(message, flush=True)
