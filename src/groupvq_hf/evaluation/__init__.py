"""Evaluation: pretrained feature networks, streaming metrics, evaluation protocols (default, SimVQ's, the ADM
evaluator's), model evaluation and the resize study, codebook analysis and its figures."""

from . import analysis, evaluator, metrics, pretrained, protocols
from .analysis import *  # noqa: F401,F403
from .evaluator import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .pretrained import *  # noqa: F401,F403
from .protocols import *  # noqa: F401,F403

__all__ = [*pretrained.__all__, *metrics.__all__, *protocols.__all__, *evaluator.__all__, *analysis.__all__]
