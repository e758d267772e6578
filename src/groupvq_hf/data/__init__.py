"""Data: sources (named datasets, Hub repos, local folders / parquet / tar shards, the demo photos), decoding and
transforms, dataset sizing, and the resumable per-process stream."""

from . import sizing, sources, stream
from .sizing import *  # noqa: F401,F403
from .sources import *  # noqa: F401,F403
from .stream import *  # noqa: F401,F403

__all__ = [*sources.__all__, *sizing.__all__, *stream.__all__]
