"""What train.py needs to know about a model family, in one record."""

import os
from dataclasses import dataclass
from typing import Callable

from longctx.base import ConfigError
from longctx.models.common.args import DecoderArgs, args_from_hf_config, read_hf_config


@dataclass(frozen=True)
class ModelSpec:
    name: str  # HF model_type
    hf_architecture: str  # config.json "architectures"
    flavors: dict[str, DecoderArgs]
    family_flags: dict  # the DecoderArgs booleans that make this family
    parallelize_fn: Callable
    state_dict_adapter: type

    def args_for(self, flavor: str) -> DecoderArgs:
        """A flavor name, or a path to an HF model directory / config.json (any dimensions)."""
        if flavor in self.flavors:
            return self.flavors[flavor]
        path = os.path.join(flavor, "config.json") if os.path.isdir(flavor) else flavor
        if not path.endswith(".json") or not os.path.isfile(path):
            raise ConfigError(
                f"model.flavor={flavor!r} is neither a {self.name} flavor ({', '.join(self.flavors)}) "
                "nor an HF model directory with config.json"
            )
        return args_from_hf_file(path, expected_family=self.name, family_flags=self.family_flags)


def args_from_hf_file(path: str, expected_family: str, family_flags: dict) -> DecoderArgs:
    cfg = read_hf_config(path)
    if cfg.get("model_type") != expected_family:
        raise ConfigError(f"{path} has model_type={cfg.get('model_type')!r}, expected {expected_family!r}")
    return args_from_hf_config(cfg, **family_flags)
