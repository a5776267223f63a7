"""`python -m finetune.recipe`: the table of every recipe key, as docs/recipes-and-data.md shows it."""

from finetune.recipe.schema import keys_markdown

print(keys_markdown(), end="")
