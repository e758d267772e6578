"""Data: where images come from (`sources`: named datasets, Hub repos, local folders / parquet / tar shards; `demo`:
the built-in photos), their rows (`rows`), decoding and transforms (`decoding`), dataset sizing (`sizing`), and the
per-process stream with its resumable batches (`stream`)."""

from . import decoding, demo, rows, sizing, sources, stream
from .decoding import *  # noqa: F401,F403
from .demo import *  # noqa: F401,F403
from .rows import *  # noqa: F401,F403
from .sizing import *  # noqa: F401,F403
from .sources import *  # noqa: F401,F403
from .stream import *  # noqa: F401,F403

__all__ = [*rows.__all__, *demo.__all__, *sources.__all__, *decoding.__all__, *stream.__all__, *sizing.__all__]
