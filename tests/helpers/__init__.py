"""Shared test helpers: tiny models, tokenizers, corpora and recipes, CLI runs, a fake Hub, sparse-attention references.

Test modules import from here and never from each other.
"""
