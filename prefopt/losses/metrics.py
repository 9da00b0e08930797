"""Batch metrics, named as TRL logs them (see :mod:`prefopt.losses.api`); the fused kernels write
the same quantities and are tested against these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .api import PreferenceLossOutput


def _pair_metrics(
    output: PreferenceLossOutput, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, torch.Tensor]:
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def _kto_metrics(
    output: PreferenceLossOutput, policy_logps: torch.Tensor, desirable: torch.Tensor
) -> dict[str, torch.Tensor]:
    logps = policy_logps.detach()
    zeros = torch.zeros_like(logps)
    # A class absent from the batch gives 0/0 = NaN: there is no mean of nothing.
    count_chosen = desirable.to(logps.dtype).sum()
    count_rejected = (~desirable).to(logps.dtype).sum()
    chosen = output.chosen_rewards.sum() / count_chosen
    rejected = output.rejected_rewards.sum() / count_rejected
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": torch.where(desirable, logps, zeros).sum() / count_chosen,
        "logps/rejected": torch.where(desirable, zeros, logps).sum() / count_rejected,
        "count/chosen": count_chosen,
        "count/rejected": count_rejected,
    }

