"""The demo page (gradio)."""

from . import page
from .page import *  # noqa: F401,F403

__all__ = [*page.__all__]
