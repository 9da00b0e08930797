"""Every loss type and option prefopt shares with TRL 1.16, pinned against TRL's own loss code.

TRL's trainers compute their losses inside methods that also run the model, so each test calls
the unbound method with a stub ``self`` (the trainer's configuration and a pass-through
accelerator) and stub models that return the per-token statistics TRL's fused LM head would.
The same per-token numbers feed prefopt, and the two losses and metrics are compared in float64
(where TRL computes in float32, at float32's precision).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prefopt import cpo_loss, dpo_loss, kto_kl, kto_loss, orpo_loss
from prefopt._codes import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES
from prefopt.losses.formulas import wpo_weights
from prefopt.nn import DPOLoss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

PAIRS = 6
T = 9  # input_ids length; the per-token outputs have T - 1 positions
F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-6, atol=1e-6)  # where TRL itself rounds to float32


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _trainer(**config):
    """A stub trainer: TRL's configuration attributes, a pass-through accelerator, a metric store."""
    args = SimpleNamespace(discopop_tau=config.pop("discopop_tau", 0.05), gradient_checkpointing_kwargs=None)
    model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    return SimpleNamespace(accelerator=_Accelerator(), args=args, model=model, aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **config)


def _batch(rows, generator):
    """completion_mask [rows, T] (position 0 is prompt, then a prompt of 1-3 tokens, a completion of
    1 or more tokens, padding) and per-token statistics [rows, T-1] with exact zeros off the
    completion, as TRL's fused LM head gives them."""
    mask = torch.zeros(rows, T, dtype=torch.int64)
    for row in range(rows):
        start = int(torch.randint(1, 4, (1,), generator=generator))
        stop = int(torch.randint(start + 1, T + 1, (1,), generator=generator))
        mask[row, start:stop] = 1
    shifted = mask[:, 1:].to(torch.float64)
    logps = -3 * torch.rand(rows, T - 1, generator=generator, dtype=torch.float64) * shifted
    # log Σp² <= max log p: any value below 0 serves here.
    log_sum_sq = -2 * torch.rand(rows, T - 1, generator=generator, dtype=torch.float64) * shifted
    return mask, logps, log_sum_sq


def _outputs(logps, log_sum_sq):
    zeros = torch.zeros_like(logps)
    return SimpleNamespace(log_probs=logps, log_sum_sq_probs=log_sum_sq, entropy=zeros, mean_logits=zeros,
                           is_top1=torch.zeros_like(logps, dtype=torch.bool))


def _trl_dpo(policy, ref, mask, *, ld_alpha=None, **config):
    """TRL 1.16's DPOTrainer._compute_loss on per-token policy and reference statistics."""
    config.setdefault("loss_types", ["sigmoid"])
    config.setdefault("loss_weights", [1.0] * len(config["loss_types"]))
    trainer = _trainer(beta=config.pop("beta", 0.1), label_smoothing=config.pop("label_smoothing", 0.0),
                       f_divergence_type=config.pop("f_divergence_type", "reverse_kl"),
                       f_alpha_divergence_coef=config.pop("f_alpha_divergence_coef", 0.5),
                       use_weighting=config.pop("use_weighting", False), ld_alpha=ld_alpha,
                       precompute_ref_logps=False, **config)
    trainer.ref_model = lambda **kwargs: _outputs(*ref)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kwargs: _outputs(*policy), inputs, False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _sums(logps, mask):
    return logps.sum(-1), mask[:, 1:].sum(-1)


def _dpo_case(kind, generator):
    mask, policy, policy_sq = _batch(2 * PAIRS, generator)
    _, ref, ref_sq = _batch(2 * PAIRS, generator)
    ref = ref * mask[:, 1:]  # the reference scores the same completions
    return mask, (policy, policy_sq), (ref, ref_sq)


def _prefopt_dpo(policy, ref, mask, **options):
    sums, lengths = _sums(policy[0], mask)
    ref_sums, _ = _sums(ref[0], mask)
    return dpo_loss(sums[:PAIRS], sums[PAIRS:], ref_sums[:PAIRS], ref_sums[PAIRS:], chosen_lengths=lengths[:PAIRS],
                    rejected_lengths=lengths[PAIRS:], backend="reference", return_metrics=True, **options)


# TRL's exo_pair takes log ε, so it needs ε > 0; aot, aot_unpaired and robust read ε too.
_SMOOTHING = {"exo_pair": 0.1, "robust": 0.2, "aot": 0.15, "aot_unpaired": 0.15}


@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_dpo_loss_types_match_trl(kind):
    generator = torch.Generator().manual_seed(DPO_LOSS_TYPES.index(kind))
    mask, policy, ref = _dpo_case(kind, generator)
    eps = _SMOOTHING.get(kind, 0.0)
    expected, trl_metrics = _trl_dpo(policy, ref, mask, beta=0.3, loss_types=[kind], label_smoothing=eps)
    out, metrics = _prefopt_dpo(policy, ref, mask, beta=0.3, loss_type=kind, label_smoothing=eps)
    # TRL's exo_pair makes ε a float32 tensor, so its log ε carries float32's rounding.
    torch.testing.assert_close(out.loss, expected, **(F32 if kind == "exo_pair" else F64))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], rel=1e-12, abs=1e-12), name
    # TRL averages the wins as float32.
    assert metrics["rewards/accuracies"].item() == pytest.approx(trl_metrics["rewards/accuracies"], rel=1e-7)


def test_sigmoid_with_label_smoothing_is_cdpo_where_trl_ignores_it():
    generator = torch.Generator().manual_seed(1)
    mask, policy, ref = _dpo_case("sigmoid", generator)
    trl_loss, _ = _trl_dpo(policy, ref, mask, beta=0.3, loss_types=["sigmoid"], label_smoothing=0.2)
    plain, _ = _trl_dpo(policy, ref, mask, beta=0.3, loss_types=["sigmoid"])
    torch.testing.assert_close(trl_loss, plain, **F64)  # TRL 1.16: label_smoothing has no effect
    out, _ = _prefopt_dpo(policy, ref, mask, beta=0.3, loss_type="sigmoid", label_smoothing=0.2)
    sums, _ = _sums(policy[0], mask)
    ref_sums, _ = _sums(ref[0], mask)
    z = 0.3 * ((sums[:PAIRS] - ref_sums[:PAIRS]) - (sums[PAIRS:] - ref_sums[PAIRS:]))
    torch.testing.assert_close(out.loss, (-0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z)).mean(), **F64)
    assert not torch.allclose(out.loss, trl_loss)


def test_mpo_list_with_sft_matches_trl():
    generator = torch.Generator().manual_seed(2)
    mask, policy, ref = _dpo_case("sft", generator)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    expected, _ = _trl_dpo(policy, ref, mask, beta=0.2, loss_types=types, loss_weights=weights)
    out, _ = _prefopt_dpo(policy, ref, mask, beta=0.2, loss_type=types, loss_weights=weights)
    torch.testing.assert_close(out.loss, expected, **F64)


# The loss types TRL lets an f-divergence change (its f_divergence_loss_types).
_F_DIVERGENCE_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]


@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("kind", _F_DIVERGENCE_TYPES)
def test_f_divergences_match_trl(f_divergence_type, kind):
    generator = torch.Generator().manual_seed(3 + _F_DIVERGENCE_TYPES.index(kind))
    mask, policy, ref = _dpo_case(kind, generator)
    if kind == "discopop":
        # TRL's discopop forms exp(-z) outright, which overflows (inf·0 = NaN) where forward KL's
        # scores reach -40 or so; prefopt's log-space form stays finite. Keep the log-ratios small.
        policy = (policy[0] / 10, policy[1])
        ref = (ref[0] / 10, ref[1])
    options = dict(beta=0.3, label_smoothing=_SMOOTHING.get(kind, 0.0), f_divergence_type=f_divergence_type,
                   f_alpha_divergence_coef=0.3)
    if f_divergence_type == "alpha_divergence":
        # TRL's α-divergence clamps by dtype and knows no float64: compare in float32.
        policy = tuple(t.float() for t in policy)
        ref = tuple(t.float() for t in ref)
    expected, _ = _trl_dpo(policy, ref, mask, loss_types=[kind], **options)
    out, _ = _prefopt_dpo(policy, ref, mask, loss_type=kind, **options)
    tolerance = F32 if f_divergence_type == "alpha_divergence" or kind == "exo_pair" else F64
    torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), **tolerance)
    if f_divergence_type != "reverse_kl" and kind != "sft":
        plain, _ = _prefopt_dpo(policy, ref, mask, loss_type=kind, **{**options, "f_divergence_type": "reverse_kl"})
        assert not torch.allclose(plain.loss, out.loss)  # the option is not a no-op


def test_alpha_divergence_at_one_is_reverse_kl_as_in_trl():
    generator = torch.Generator().manual_seed(4)
    mask, policy, ref = _dpo_case("sigmoid", generator)
    out, _ = _prefopt_dpo(policy, ref, mask, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    plain, _ = _prefopt_dpo(policy, ref, mask)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)


# TRL 1.16 refuses aot and aot_unpaired with use_weighting, and fails on sft with it (it scales
# the expanded batch NLL in place); prefopt raises for all three.
@pytest.mark.parametrize("kind", [kind for kind in DPO_LOSS_TYPES if kind not in ("aot", "aot_unpaired", "sft")])
def test_use_weighting_matches_trl(kind):
    generator = torch.Generator().manual_seed(5 + DPO_LOSS_TYPES.index(kind))
    mask, policy, ref = _dpo_case(kind, generator)
    eps = _SMOOTHING.get(kind, 0.0)
    expected, _ = _trl_dpo(policy, ref, mask, beta=0.3, loss_types=[kind], label_smoothing=eps, use_weighting=True)
    shifted = mask[:, 1:]
    aligned = ((policy[0] - policy[1]) * shifted).sum(-1) / shifted.sum(-1).clamp(min=1)
    weights = wpo_weights(aligned)
    out, _ = _prefopt_dpo(policy, ref, mask, beta=0.3, loss_type=kind, label_smoothing=eps,
                          chosen_weights=weights[:PAIRS], rejected_weights=weights[PAIRS:])
    torch.testing.assert_close(out.loss, expected, **(F32 if kind == "exo_pair" else F64))
    unweighted, _ = _prefopt_dpo(policy, ref, mask, beta=0.3, loss_type=kind, label_smoothing=eps)
    assert not torch.allclose(unweighted.loss, out.loss)


def _logits_case(generator, vocab=11):
    """Logits [2B, T-1, V] and shifted labels with TRL's completion layout, and the per-token
    statistics TRL's fused LM head would return for them."""
    mask, _, _ = _batch(2 * PAIRS, generator)
    shifted = mask[:, 1:].bool()
    logits = torch.randn(2 * PAIRS, T - 1, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * PAIRS, T - 1), generator=generator)
    log_softmax = logits.log_softmax(-1)
    logps = log_softmax.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * shifted
    log_sum_sq = torch.logsumexp(2 * log_softmax, -1) * shifted
    return mask, logits, labels.masked_fill(~shifted, -100), (logps, log_sum_sq)


@pytest.mark.parametrize(
    "options",
    [
        {"ld_alpha": 0.4},
        {"ld_alpha": 0.0, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
        {"use_weighting": True},
        {"use_weighting": True, "ld_alpha": 0.7, "loss_type": "ipo"},
        {"f_divergence_type": "js_divergence", "loss_type": "sigmoid_norm"},
    ],
    ids=["ld_alpha", "ld_alpha-sft", "use_weighting", "wpo-ld-ipo", "js-sigmoid_norm"],
)
def test_dpo_module_options_match_trl(options):
    generator = torch.Generator().manual_seed(6)
    mask, logits, labels, policy = _logits_case(generator)
    _, ref_logits, _, _ = _logits_case(torch.Generator().manual_seed(7))
    ref_shifted = labels != -100
    ref_log_softmax = ref_logits.log_softmax(-1)
    ref = (ref_log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * ref_shifted,
           torch.zeros_like(policy[1]))
    kind = options.get("loss_type", "sigmoid")
    types = [kind] if isinstance(kind, str) else kind
    expected, trl_metrics = _trl_dpo(
        policy, ref, mask, beta=0.2, loss_types=types, loss_weights=options.get("loss_weights", [1.0] * len(types)),
        ld_alpha=options.get("ld_alpha"), use_weighting=options.get("use_weighting", False),
        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
    )
    module = DPOLoss(beta=0.2, backend="reference", **options)
    loss, metrics = module(logits, labels, ref_logits=ref_logits)
    torch.testing.assert_close(loss, expected, **F64)
    assert metrics["logps/chosen"].item() == pytest.approx(trl_metrics["logps/chosen"], rel=1e-12)
    plain, _ = DPOLoss(beta=0.2, loss_type=kind, loss_weights=options.get("loss_weights"),
                       backend="reference")(logits, labels, ref_logits=ref_logits)
    assert not torch.allclose(plain, loss)


@pytest.mark.parametrize("kind", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(kind):
    generator = torch.Generator().manual_seed(8)
    mask, policy, _ = _batch(2 * PAIRS, generator)
    _, ref, _ = _batch(2 * PAIRS, generator)
    ref = ref * mask[:, 1:]
    desirable = torch.rand(2 * PAIRS, generator=generator) < 0.5
    kl_policy = -20 * torch.rand(2 * PAIRS, generator=generator, dtype=torch.float64)
    kl_ref = kl_policy - torch.rand(2 * PAIRS, generator=generator, dtype=torch.float64)
    trainer = _trainer(beta=0.3, loss_type=kind, desirable_weight=1.3, undesirable_weight=0.7,
                       calculate_KL=kind == "kto", precompute_ref_logps=True)
    trainer._compute_kl_logps = lambda model, batch: kl_policy
    batch = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "label": desirable, "ref_logps": ref.sum(-1), "ref_KL_logps": kl_ref}
    expected = trl_kto.KTOTrainer._compute_loss(trainer, lambda **kwargs: _outputs(policy, policy), batch, False)
    kl = kto_kl(kl_policy, kl_ref)
    out, metrics = kto_loss(policy.sum(-1), ref.sum(-1), desirable, kl=kl, beta=0.3, desirable_weight=1.3,
                            undesirable_weight=0.7, loss_type=kind, backend="reference", return_metrics=True)
    torch.testing.assert_close(out.loss, expected, **F64)
    trl_metrics = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name][-1], rel=1e-12), name


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_loss_types_and_alphapo_match_trl(kind, alpha):
    generator = torch.Generator().manual_seed(9)
    lengths = torch.randint(1, 30, (2, PAIRS), generator=generator)
    sums = -lengths * torch.rand(2, PAIRS, generator=generator, dtype=torch.float64)
    averaged = kind in ("ipo", "simpo")  # TRL's concatenated_forward averages for these two
    trl_inputs = sums / lengths if averaged else sums
    trainer = _trainer(beta=0.4, loss_type=kind, label_smoothing=0.1 if kind in ("sigmoid", "simpo") else 0.0,
                       simpo_gamma=0.6, alpha=alpha)
    losses, chosen_rewards, rejected_rewards = trl_cpo.CPOTrainer.cpo_loss(trainer, trl_inputs[0], trl_inputs[1])
    out = cpo_loss(sums[0], sums[1], beta=0.4, loss_type=kind, label_smoothing=trainer.label_smoothing,
                   simpo_gamma=0.6, cpo_alpha=0.0, alpha=alpha, chosen_lengths=lengths[0],
                   rejected_lengths=lengths[1], backend="reference")
    torch.testing.assert_close(out.losses, losses, **F64)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, **F64)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, **F64)
    if alpha != 0.0:
        plain = cpo_loss(sums[0], sums[1], beta=0.4, loss_type=kind, label_smoothing=trainer.label_smoothing,
                         simpo_gamma=0.6, cpo_alpha=0.0, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                         backend="reference")
        assert not torch.allclose(plain.losses, out.losses)


def test_orpo_matches_trl():
    generator = torch.Generator().manual_seed(10)
    average = -2 * torch.rand(2, PAIRS, generator=generator, dtype=torch.float64)
    trainer = _trainer(beta=0.2)
    # TRL's odds_ratio_loss computes in float32.
    ratio_terms, chosen_rewards, _, ratio, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(
        trainer, average[0], average[1])
    nll = torch.tensor(1.7, dtype=torch.float64)
    out, metrics = orpo_loss(average[0], average[1], beta=0.2, chosen_nll=nll, backend="reference",
                             return_metrics=True)
    expected = nll - ratio_terms.double().mean()  # TRL's loss: policy NLL minus the mean odds-ratio term
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert metrics["log_odds_ratio"].item() == pytest.approx(ratio.item(), rel=1e-6)
    assert metrics["log_odds_chosen"].item() == pytest.approx(log_odds.item(), rel=1e-6)
    assert math.isfinite(chosen_rewards.sum().item())
