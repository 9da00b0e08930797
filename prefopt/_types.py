from typing import NamedTuple

import torch

STAT_NAMES = ("entropy", "mean_logits", "log_sum_sq_probs", "is_top1")


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(z) at the labels, z = softcap(logits) / temperature.

    Every field has the labels' shape; positions whose label is ignored hold 0 (False).
    Fields not asked for are None.

    - logps: log p[label], float32, <= 0.
    - entropy: -sum_j p_j log p_j, float32.
    - mean_logits: sum_j z_j / V, float32 (the vocabulary-mean logit TRL logs).
    - log_sum_sq_probs: log sum_j p_j^2, float32.
    - is_top1: bool, the label is the argmax of z, ties going to the earlier token.
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
