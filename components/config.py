"""Job config: torchtitan 0.2.2's JobConfig (TOML + `--section.key` CLI overrides) plus our fields.

Every error while parsing becomes one line naming the bad key or value (ConfigError)."""

import contextlib
import io
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Literal

from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TitanJobConfig
from torchtitan.config.job_config import Model as TitanModel
from torchtitan.config.job_config import Parallelism as TitanParallelism
from torchtitan.config.job_config import Training as TitanTraining


class ConfigError(ValueError):
    """A bad config key or value; the message is the one line shown to the user."""


@dataclass
class Model(TitanModel):
    name: str = "qwen3"
    """Model family: "qwen3" or "qwen2" (Qwen2 and Qwen2.5)."""

    flavor: str = "debugmodel"
    """A size of the family (see models/<family>/__init__.py), or an HF model folder / config.json."""

    hf_assets_path: str = "assets/debug"
    """Folder with tokenizer.json (and tokenizer_config.json): an HF model folder works."""


@dataclass
class Parallelism(TitanParallelism):
    context_parallel_impl: Literal["ulysses"] = "ulysses"
    """Context parallel algorithm: "ulysses" (all-to-all over heads; DeepSpeed-Ulysses)."""


@dataclass
class Training(TitanTraining):
    dataset: str = "auto"
    """Format of training.dataset_path: "auto" (from the file extension), "text", "json" or "parquet"."""

    dataset_path: str | None = "assets/debug/corpus.jsonl"
    """A local file or folder of documents (text, JSON lines or parquet)."""


@dataclass
class Recipe:
    name: Literal["pretrain"] = "pretrain"
    """What one step computes: "pretrain" (packed text, next-token loss)."""

    text_field: str = "text"
    """The JSON/parquet column that holds document text."""

    loss_chunk_size: int = 4096
    """Tokens per chunk of the chunked cross-entropy: the logits of one chunk exist at a time."""


@dataclass
class JobConfig(TitanJobConfig):
    model: Model = field(default_factory=Model)
    parallelism: Parallelism = field(default_factory=Parallelism)
    training: Training = field(default_factory=Training)
    recipe: Recipe = field(default_factory=Recipe)


def _check_cli_keys(args: list[str]) -> None:
    """tyro reports unknown flags in a multi-line box; name the bad key in one line instead."""
    sections = {f.name: f.type for f in fields(JobConfig)}
    for arg in args:
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        section, _, name = key.partition(".")
        if section not in sections or not is_dataclass(sections[section]):
            raise ConfigError(f"unknown config section in {arg!r}; valid sections: {', '.join(sections)}")
        valid = {f.name for f in fields(sections[section])}
        if name not in valid:
            raise ConfigError(f"unknown config key --{section}.{name}; valid keys of [{section}]: {', '.join(sorted(valid))}")


def _one_line(tyro_output: str) -> str:
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", tyro_output).split())
    match = re.search(r"(Error parsing .*?)(?: Argument helptext| For full helptext|$)", text)
    return match.group(1) if match else text[:300]


def _check_config_file(args: list[str]) -> None:
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key.replace("-", "_") == "--job.config_file":
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            if not os.path.isfile(path):
                raise ConfigError(f"--job.config_file {path!r} does not exist; see train_configs/ for examples")


def parse_config(args: list[str]) -> JobConfig:
    _check_cli_keys(args)
    _check_config_file(args)
    manager = ConfigManager(JobConfig)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return manager.parse_args(args)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise ConfigError(_one_line(stderr.getvalue())) from None
    except (ValueError, TypeError, OSError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"bad job config: {message}") from None
