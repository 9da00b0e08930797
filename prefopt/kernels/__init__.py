"""Triton kernels of prefopt, installed as ``prefopt.kernels``. Importing this module needs Triton."""

from .token_stats_bwd import token_stats_backward
from .token_stats_fwd import token_stats_forward

__all__ = ["token_stats_backward", "token_stats_forward"]
