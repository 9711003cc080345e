"""Recipes: what one training step computes from a batch.

A recipe has `vocab_size` (its tokenizer's; 0 when it needs none), `build_stream(padded_len)`
(a PackedStream of rows) and `loss_sum(model, batch)` on this rank's tokens, returning
(sum of token losses, metric_sums): train_step divides the loss by the GLOBAL count of labelled
tokens (labels != IGNORE_INDEX) and reports each metric sum (a per-token quantity summed over
labelled tokens, e.g. the policy's clip fraction) as a mean over the global batch.
"""


def build_recipe(job_config):
    from recipes.policy import PolicyRecipe
    from recipes.pretrain import PretrainRecipe
    from recipes.sft import SFTRecipe

    recipes = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "policy": PolicyRecipe}
    return recipes[job_config.recipe.name](job_config)
