"""Recipes: one YAML file with sections model / adapter / data / train / output / eval.

- schema.py      the section dataclasses; every key documented (`moetune recipes`, the docs' table)
- validation.py  types, ranges, cross-field rules; all the problems of a recipe reported together,
                 one line each, naming the file, the key and the fix (with did-you-mean)
- files.py       YAML reading, `--set` overrides, the bundled recipes, `save_recipe`

The names below are the package's interface; `python -m finetune.recipe` prints the key table of
docs/recipes-and-data.md.
"""

from finetune.recipe.files import (
    NOT_RECIPES,
    RECIPES_DIR,
    RecipeEntry,
    RecipeList,
    find_recipe,
    header_comment,
    list_recipes,
    load_recipe,
    parse_yaml,
    recipe_from_dict,
    resolve_bundled_paths,
    save_recipe,
)
from finetune.recipe.schema import (
    EXCLUSIVE,
    HEADLINE_DEFAULTS,
    NOT_EMPTY,
    ONE_OR_LIST,
    REQUIRED,
    SECTIONS,
    AdapterSection,
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    Recipe,
    TrainSection,
    describe_keys,
    esft_profile,
    keys_markdown,
    recipe_to_dict,
)
from finetune.recipe.validation import RecipeProblems

__all__ = [
    "EXCLUSIVE",
    "HEADLINE_DEFAULTS",
    "NOT_EMPTY",
    "NOT_RECIPES",
    "ONE_OR_LIST",
    "RECIPES_DIR",
    "REQUIRED",
    "SECTIONS",
    "AdapterSection",
    "DataSection",
    "EvalSection",
    "ModelSection",
    "OutputSection",
    "Recipe",
    "RecipeEntry",
    "RecipeList",
    "RecipeProblems",
    "TrainSection",
    "describe_keys",
    "esft_profile",
    "find_recipe",
    "header_comment",
    "keys_markdown",
    "list_recipes",
    "load_recipe",
    "parse_yaml",
    "recipe_from_dict",
    "recipe_to_dict",
    "resolve_bundled_paths",
    "save_recipe",
]
