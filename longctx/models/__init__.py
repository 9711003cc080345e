"""Model families by name (the HF `model_type`)."""

from longctx.base import ConfigError
from longctx.models.common.spec import ModelSpec
from longctx.models.qwen2 import QWEN2
from longctx.models.qwen3 import QWEN3

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (QWEN2, QWEN3)}


def get_model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is unknown; choose one of {sorted(MODELS)}")
    return MODELS[name]
