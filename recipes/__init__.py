"""Recipes: what one training step computes from a batch."""


def build_recipe(job_config):
    from recipes.pretrain import PretrainRecipe

    recipes = {"pretrain": PretrainRecipe}
    return recipes[job_config.recipe.name](job_config)
