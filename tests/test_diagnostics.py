"""PreferenceMonitor: each warning fires on a synthetic history of its failure mode, and a
healthy run stays silent."""

import math
import random
import warnings

import pytest
import torch
from conftest import DEVICE

from prefopt.diagnostics import CHECKS, PreferenceMonitor, PreferenceTrainingWarning
from prefopt.nn import DPOLoss


def healthy(step: int, rng: random.Random) -> dict[str, float]:
    """A DPO run that learns: accuracy 0.55 -> 0.8, margins grow, likelihoods hold, loss falls."""
    progress = min(step / 300, 1.0)
    noise = lambda scale: rng.uniform(-scale, scale)  # noqa: E731
    margin = 0.02 + 0.6 * progress
    return {
        "rewards/chosen": 0.01 + 0.3 * progress + noise(0.005),
        "rewards/rejected": 0.01 - 0.3 * progress + noise(0.005),
        "rewards/margins": margin + noise(0.01),
        "rewards/accuracies": 0.55 + 0.25 * progress + noise(0.02),
        "logps/chosen": -120.0 + 5 * progress + noise(1.0),
        "logps/rejected": -130.0 - 20 * progress + noise(1.0),
        "completion_length/chosen": 100 + noise(5),
        "completion_length/rejected": 110 + noise(5),
        "loss": math.log1p(math.exp(-margin)) + noise(0.01),
    }


def run(history, monitor=None, **kwargs) -> list[PreferenceTrainingWarning]:
    monitor = monitor or PreferenceMonitor(**{"beta": 0.1, **kwargs})
    raised = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for metrics in history:
            raised += monitor.update(metrics)
    emitted = [w.message for w in caught if issubclass(w.category, PreferenceTrainingWarning)]
    assert [str(w) for w in emitted] == [str(w) for w in raised]  # warned and returned alike
    return raised


def kinds(raised) -> set[str]:
    return {w.kind for w in raised}


def test_healthy_run_is_silent():
    rng = random.Random(0)
    assert run([healthy(step, rng) for step in range(300)]) == []


def test_healthy_kto_run_is_silent():
    rng = random.Random(1)
    history = [
        {"rewards/chosen": 0.2 * step / 200, "rewards/rejected": -0.2 * step / 200,
         "rewards/margins": 0.4 * step / 200 + rng.uniform(-0.005, 0.005), "logps/chosen": -80.0,
         "kl": torch.tensor(0.5 + rng.uniform(0, 0.2)), "completion_length/chosen": 60.0,
         "completion_length/rejected": 64.0, "logps/rejected": float("nan")}
        for step in range(200)
    ]
    assert run(history, beta=None) == []


def test_collapse():
    rng = random.Random(2)
    history = []
    for step in range(200):
        metrics = healthy(step, rng)
        metrics["logps/chosen"] = -120.0 - 0.3 * step  # falls 60 nats over the run
        history.append(metrics)
    raised = run(history)
    assert kinds(raised) == {"collapse"}
    assert "raise beta" in str(raised[0]).lower() and "logps/chosen" in str(raised[0])


def test_not_learning_waits_for_the_warm_up():
    rng = random.Random(3)
    history = []
    for step in range(120):
        metrics = healthy(step, rng)
        metrics["rewards/accuracies"] = 0.5 + rng.uniform(-0.03, 0.03)
        history.append(metrics)
    raised = run(history, warmup_steps=80)
    assert kinds(raised) == {"not_learning"}
    assert raised[0].step == 81
    assert "learning rate" in str(raised[0])
    assert run(history[:80], warmup_steps=80) == []


def test_overfitting():
    rng = random.Random(4)
    history = []
    for step in range(60):
        metrics = healthy(step + 300, rng)
        metrics["rewards/accuracies"] = 1.0
        metrics["rewards/margins"] = 0.6 + 0.05 * step  # still growing: no plateau
        metrics["loss"] = 0.01
        history.append(metrics)
    raised = run(history, warmup_steps=0)
    assert kinds(raised) == {"overfitting"}
    assert "IPO" in str(raised[0])
    # High accuracy with a loss that is not near 0 is not overfitting.
    for metrics in history:
        metrics["loss"] = 0.3
    assert run(history, warmup_steps=0) == []


def test_margin_plateau():
    rng = random.Random(5)
    history = []
    for step in range(150):
        metrics = healthy(step, rng)
        metrics["rewards/margins"] = min(step, 60) * 0.01 + rng.uniform(-0.002, 0.002)
        history.append(metrics)
    raised = run(history, warmup_steps=50)
    assert kinds(raised) == {"margin_plateau"}
    assert raised[0].step > 60 + 20  # only once a whole window has gone flat


def test_kl_from_rewards_and_from_the_kto_metric():
    rng = random.Random(6)
    history = []
    for step in range(40):
        metrics = healthy(step, rng)
        # log-ratios of +2 and -4 nats over ~105 tokens: (2 + 4) / 2 / 105 = 0.029 nats/token.
        metrics["rewards/chosen"], metrics["rewards/rejected"] = 0.2, -0.4
        history.append(metrics)
    assert run(history) == []
    for metrics in history:
        metrics["rewards/chosen"], metrics["rewards/rejected"] = 2.0, -4.0  # 0.29 nats/token
    raised = run(history)
    assert kinds(raised) == {"kl"} and "nats per token" in str(raised[0]) and "raise beta" in str(raised[0]).lower()
    # Without beta the pairwise estimate is off; a KTO kl metric is used directly.
    assert run(history, beta=None) == []
    kto = [{"kl": 30.0, "completion_length/chosen": 100.0, "completion_length/rejected": 100.0}] * 40
    assert kinds(run(kto, beta=None)) == {"kl"}


@pytest.mark.parametrize("direction", [1, -1])
def test_length_drift(direction):
    rng = random.Random(7)
    history = []
    for step in range(120):
        metrics = healthy(step, rng)
        # About 104 tokens over the first window, then ~38% longer or shorter.
        metrics["completion_length/chosen"] = metrics["completion_length/rejected"] = 100 + direction * 0.4 * step
        history.append(metrics)
    raised = run(history)
    assert kinds(raised) == {"length_drift"}
    assert "SimPO" in str(raised[0]) and ("+" if direction > 0 else "-") in str(raised[0])
    assert run(history[:60]) == []  # only about 15% by then, under the 20% threshold
    # An explicit completion_length (of generated samples) takes precedence over the metrics.
    monitor = PreferenceMonitor(beta=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        silent = [monitor.update(metrics, completion_length=torch.tensor(50.0)) for metrics in history]
    assert not any(silent)


def test_a_lasting_condition_repeats_once_per_window():
    history = [{"rewards/accuracies": 1.0, "loss": 0.001}] * 100
    raised = run(history, window=10, warmup_steps=0)
    assert [w.step for w in raised] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_reads_tensors_and_skips_missing_or_nan_values():
    monitor = PreferenceMonitor(beta=0.1, window=2, warmup_steps=0)
    with pytest.warns(PreferenceTrainingWarning, match="overfitting"):
        for _ in range(2):
            monitor.update({"rewards/accuracies": torch.tensor(1.0, device=DEVICE),
                            "rewards/chosen": torch.tensor(float("nan"))}, loss=torch.tensor(0.0))
    assert monitor.update({}) == []
    with pytest.raises(TypeError, match="metrics"):
        monitor.update([("loss", 1.0)])
    with pytest.raises(ValueError, match="rewards/margins"):
        monitor.update({"rewards/margins": torch.zeros(3)})
    with pytest.raises(TypeError, match="logps/chosen"):
        monitor.update({"logps/chosen": "high"})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.5}, TypeError, "window"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"not_learning_band": 0.7}, ValueError, "not_learning_band"),
        ({"overfit_accuracy": 1.5}, ValueError, "overfit_accuracy"),
        ({"kl_threshold": -0.1}, ValueError, "kl_threshold"),
        ({"length_drift": "20%"}, TypeError, "length_drift"),
    ],
)
def test_bad_thresholds(kwargs, error, match):
    with pytest.raises(error, match=match):
        PreferenceMonitor(**kwargs)


def test_reads_the_metrics_of_a_module():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 5, 11, generator=g).to(DEVICE)
    labels = torch.randint(0, 11, (4, 5), generator=g).to(DEVICE)
    monitor = PreferenceMonitor(beta=0.1, window=2, warmup_steps=0, kl_threshold=1e-9)
    for _ in range(2):
        loss, metrics = DPOLoss(backend="torch")(logits, labels, ref_logps=torch.full((4,), -20.0, device=DEVICE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raised = monitor.update(metrics, loss=loss)
    assert "kl" in kinds(raised)  # a KL estimate was formed from the module's reward metrics
    assert set(CHECKS) >= kinds(raised)
