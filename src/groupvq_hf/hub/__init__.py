"""The Hub: model cards, publishing, checkpoint conversion (diffusers, SimVQ), and their command lines."""

from . import cards, cli, conversion, publishing, simvq_conversion
from .cards import *  # noqa: F401,F403
from .cli import *  # noqa: F401,F403
from .conversion import *  # noqa: F401,F403
from .publishing import *  # noqa: F401,F403
from .simvq_conversion import *  # noqa: F401,F403

__all__ = [*cards.__all__, *publishing.__all__, *conversion.__all__, *simvq_conversion.__all__, *cli.__all__]
