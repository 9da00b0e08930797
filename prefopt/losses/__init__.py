"""The preference losses on per-sequence log-probabilities (see :mod:`prefopt.losses.api`)."""

from .api import *  # noqa: F403 (the public names are api's)
from .api import __all__  # noqa: F401
