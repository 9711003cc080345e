"""Recipes: what one training step computes from a batch (docs/design.md, "Recipes")."""

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from recipes.data import PackedStream
    from recipes.tokenized import TokenStream


class Recipe(Protocol):
    """What train.py asks of a recipe; pretrain, sft and policy satisfy it structurally."""

    vocab_size: int  # its tokenizer's (0 when it needs none); validate refuses one above the model's

    def build_stream(self, padded_len: int) -> "PackedStream | TokenStream":
        """The rows it trains on, each padded_len tokens (components.build.padded_seq_len); a
        TokenStream only for pretrain on a folder of scripts/tokenize_corpus.py."""
        ...

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of token losses on this rank's tokens, metric_sums). train_step divides the loss by
        the GLOBAL count of labelled tokens (labels != IGNORE_INDEX) and reports each metric sum (a
        per-token quantity summed over labelled tokens, e.g. the policy's clip fraction) as a mean
        over the global batch."""
        ...


def build_recipe(job_config) -> Recipe:
    from recipes.data import DataError
    from recipes.policy import PolicyRecipe
    from recipes.pretrain import PretrainRecipe
    from recipes.sft import SFTRecipe
    from recipes.tokenized import is_token_folder

    recipes = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "policy": PolicyRecipe}
    name, path = job_config.recipe.name, job_config.training.dataset_path
    if name != "pretrain" and is_token_folder(path):  # its rows have no chat turns or rollout fields
        raise DataError(f"training.dataset_path={path!r} is tokenized text, which only recipe.name=pretrain reads; "
                        f"point the {name} recipe at the raw records")
    return recipes[job_config.recipe.name](job_config)
