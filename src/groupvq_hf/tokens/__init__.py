"""Tokens for generative models: tokenize a dataset into a `datasets` dataset of token grids (at the trained or any
resized codebook size) and decode token rows back to images."""

from . import card
from . import tokenization
from .card import *  # noqa: F401,F403
from .tokenization import *  # noqa: F401,F403

__all__ = [*card.__all__, *tokenization.__all__]
