"""Training with accelerate: arguments, checkpoints, the loop, validation and export, and the VQGAN losses."""

from . import arguments, checkpoints, finetune, loop, losses
from .arguments import *  # noqa: F401,F403
from .checkpoints import *  # noqa: F401,F403
from .finetune import *  # noqa: F401,F403
from .loop import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403

__all__ = [*arguments.__all__, *checkpoints.__all__, *finetune.__all__, *loop.__all__, *losses.__all__]
