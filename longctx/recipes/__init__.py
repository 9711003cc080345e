"""Recipes: what one training step computes from a batch (docs/design.md, "Recipes")."""

from typing import Protocol

import torch

from longctx.base import DataError
from longctx.data.loader import Stream
from longctx.data.token_shards import is_token_folder


class Recipe(Protocol):
    """What train.py asks of a recipe; pretrain, sft and policy satisfy it structurally."""

    vocab_size: int  # its tokenizer's (0 when it needs none); validate refuses one above the model's

    def build_stream(self) -> Stream:
        """The rows it trains on; the loader asks for each step's rows at that step's length
        (data/loader.RowSchedule). A TokenStream only for pretrain on a folder of tokenize_corpus.py."""
        ...

    def loss_sum(self, model, batch: dict[str, torch.Tensor], loss_chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of token losses on this rank's tokens, metric_sums), the logits `loss_chunk` tokens at a
        time (the job's ModelSettings.loss_chunk). train_step divides the loss by
        the GLOBAL count of labelled tokens (labels != IGNORE_INDEX) and reports each metric sum (a
        per-token quantity summed over labelled tokens, e.g. the policy's clip fraction) as a mean
        over the global batch."""
        ...


def build_recipe(job_config, section: str = "training") -> Recipe:
    """The job's recipe over the documents of `section`'s dataset_path and dataset: "training", or
    "validation" for the held-out set (read and checked exactly as training data; a refusal names
    validation.dataset_path)."""
    from longctx.recipes.policy import PolicyRecipe
    from longctx.recipes.pretrain import PretrainRecipe
    from longctx.recipes.sft import SFTRecipe

    recipes = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "policy": PolicyRecipe}
    name, path = job_config.recipe.name, getattr(job_config, section).dataset_path
    if name != "pretrain" and is_token_folder(path):  # its rows have no chat turns or rollout fields
        raise DataError(f"{section}.dataset_path={path!r} is tokenized text, which only recipe.name=pretrain reads; "
                        f"point the {name} recipe at the raw records")
    return recipes[job_config.recipe.name](job_config, section)
