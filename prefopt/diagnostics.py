"""Training diagnostics for preference optimization: a monitor that reads the metrics each step
and warns about the usual failure modes, with what to try.

    monitor = PreferenceMonitor(beta=0.1)
    for batch in data:
        loss, metrics = dpo(logits, labels, ref_logps=ref)
        ...
        monitor.update(metrics, loss=loss)     # warns, and returns the warnings it raised

:meth:`PreferenceMonitor.update` reads every value with ``float()``, which waits for the GPU: it
is meant to run where the metrics are logged anyway (every logging step), never inside the
compiled or graph-captured step. Values may be tensors or Python numbers; a missing or
non-finite value (e.g. KTO's mean over a class absent from the batch) is skipped.

The checks, each on means over a window of steps (``window``, 20 by default), and what each
warning suggests:

``collapse``
    ``logps/chosen`` fell by more than ``collapse_drop`` (10%) of its size from the first window
    to the last: the policy lowers the likelihood of the preferred answers along with the
    rejected ones (likelihood displacement). Raise β, add an NLL term on the chosen answers
    (RPO, ``cpo_alpha``), use a loss that anchors the chosen likelihood (IPO, ``apo_down``), or
    lower the learning rate.
``not_learning``
    after ``warmup_steps`` (50), ``rewards/accuracies`` stays within ``not_learning_band``
    (0.05) of 0.5: chosen and rejected are not being separated. Raise the learning rate, check
    that the pairs are neither swapped nor identical; a very small β also means small gradients.
``overfitting``
    ``rewards/accuracies`` above ``overfit_accuracy`` (0.99) while the loss is below
    ``overfit_loss`` (0.05): every pair is separated and DPO keeps pushing the margins without
    bound. Raise β, switch to IPO (a finite margin target), add label smoothing, lower the
    learning rate or stop earlier.
``margin_plateau``
    after the warm-up, the mean ``rewards/margins`` of the last window exceeds that of the window
    before by no more than ``margin_min_growth`` (0): the loss saturated or the learning rate
    decayed. With low accuracy raise the learning rate or lower β; with high accuracy the run
    has converged.
``kl``
    the estimated KL from the policy to the reference exceeds ``kl_threshold`` (0.2 nats per
    completion token): the policy has drifted where the implicit reward is unreliable. Raise β,
    lower the learning rate, or switch to IPO. The estimate is the ``kl`` metric when there is
    one (KTO's batch estimate), else ``(|rewards/chosen| + |rewards/rejected|) / (2β)``, the
    size of the mean policy/reference log-ratio of the trained completions (which needs
    ``beta``). Both are per sequence; they are divided by the mean completion length when it is
    known (see ``length_drift``). It is a proxy: the true KL is an expectation over the
    policy's own samples, which an offline batch does not hold; a negative mean log-ratio
    (DPO commonly lowers both likelihoods) is drift too, hence the absolute values.
``length_drift``
    the mean completion length moved by more than ``length_drift`` (20%) from the first window:
    the policy may be exploiting length. Use a length-normalized loss (SimPO, IPO with lengths,
    ``sigmoid_norm``), a length penalty (R-DPO), or length-balanced data. The length is the
    ``completion_length`` argument of :meth:`~PreferenceMonitor.update` (e.g. of generated
    samples), else the ``completion_length`` metric, else the mean of
    ``completion_length/chosen`` and ``completion_length/rejected`` (which the
    :mod:`prefopt.nn` modules log).

A check that fires stays quiet for the next ``window`` steps, so a lasting condition is repeated
at that rate rather than every step.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import deque
from collections.abc import Mapping

import torch

__all__ = ["PreferenceMonitor", "PreferenceTrainingWarning"]

CHECKS = ("collapse", "not_learning", "overfitting", "margin_plateau", "kl", "length_drift")


class PreferenceTrainingWarning(UserWarning):
    """A warning of :class:`PreferenceMonitor`. ``kind`` is the check (one of ``CHECKS``) and
    ``step`` the monitor's step count when it fired."""

    def __init__(self, kind: str, step: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.step = step


class _Series:
    """The first ``window`` values of a metric and the last ``2 * window``."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.first: list[float] = []
        self.recent: deque[float] = deque(maxlen=2 * window)

    def add(self, value: float) -> None:
        if len(self.first) < self.window:
            self.first.append(value)
        self.recent.append(value)

    def baseline(self) -> float | None:
        return sum(self.first) / self.window if len(self.first) == self.window else None

    def last(self) -> float | None:
        if len(self.recent) < self.window:
            return None
        return sum(list(self.recent)[-self.window:]) / self.window

    def previous(self) -> float | None:
        if len(self.recent) < 2 * self.window:
            return None
        return sum(list(self.recent)[: self.window]) / self.window


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def _read(value: object, name: str) -> float | None:
    """A metric as a float; None when it is absent or not finite."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics[{name!r}] must be a single value, got shape {tuple(value.shape)}")
        value = value.detach().item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"metrics[{name!r}] must be a tensor or a real number, got {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


class PreferenceMonitor:
    """Watches the metrics of a preference-optimization run and warns about failure modes.

    Args (see the module docstring for what each check means and suggests):
        beta: the loss's β, to turn rewards back into log-ratios for the KL estimate; None
            leaves the pairwise KL check off (KTO's ``kl`` metric needs no β).
        window: steps per averaging window (>= 1); also each check's quiet period.
        warmup_steps: steps before ``not_learning`` and ``margin_plateau`` may fire.
        collapse_drop: relative fall of ``logps/chosen`` that counts as collapse (> 0).
        not_learning_band: half-width of the band around 0.5 accuracy that counts as chance.
        overfit_accuracy, overfit_loss: accuracy above and loss below which the run overfits.
        margin_min_growth: the least growth of the windowed mean margin that counts as growing.
        kl_threshold: KL estimate (nats per completion token) above which to warn.
        length_drift: relative change of the mean completion length that counts as drift.
    """

    def __init__(
        self,
        *,
        beta: float | None = None,
        window: int = 20,
        warmup_steps: int = 50,
        collapse_drop: float = 0.1,
        not_learning_band: float = 0.05,
        overfit_accuracy: float = 0.99,
        overfit_loss: float = 0.05,
        margin_min_growth: float = 0.0,
        kl_threshold: float = 0.2,
        length_drift: float = 0.2,
    ) -> None:
        if beta is not None:
            beta = _check_number("beta", beta, 0.0)
            if beta == 0.0:
                raise ValueError("beta must be > 0, got 0.0")
        self.beta = beta
        self.window = _check_count("window", window, 1)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)
        self.collapse_drop = _check_number("collapse_drop", collapse_drop, 0.0)
        self.not_learning_band = _check_number("not_learning_band", not_learning_band, 0.0, 0.5)
        self.overfit_accuracy = _check_number("overfit_accuracy", overfit_accuracy, 0.0, 1.0)
        self.overfit_loss = _check_number("overfit_loss", overfit_loss, 0.0)
        self.margin_min_growth = _check_number("margin_min_growth", margin_min_growth, -math.inf)
        self.kl_threshold = _check_number("kl_threshold", kl_threshold, 0.0)
        self.length_drift = _check_number("length_drift", length_drift, 0.0)
        self.step = 0
        self._series: dict[str, _Series] = {}
        self._last_fired: dict[str, int] = {}

    def _record(self, name: str, value: float | None) -> _Series:
        series = self._series.setdefault(name, _Series(self.window))
        if value is not None:
            series.add(value)
        return series

    def update(
        self,
        metrics: Mapping[str, torch.Tensor | float],
        *,
        loss: torch.Tensor | float | None = None,
        completion_length: torch.Tensor | float | None = None,
    ) -> list[PreferenceTrainingWarning]:
        """Record one step's metrics (and loss), run the checks, warn and return the warnings.

        Args:
            metrics: the metrics dict of a loss or module (names as TRL logs them); values are
                0-d tensors or numbers, read here with ``float()`` (a host sync on GPU tensors).
            loss: the step's loss; falls back to ``metrics["loss"]``.
            completion_length: mean completion length of the step, e.g. of generated samples;
                falls back to the metrics (see the module docstring).

        Returns:
            The :class:`PreferenceTrainingWarning` raised at this step (also emitted with
            :func:`warnings.warn`).
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of names to values, got {type(metrics).__name__}")
        self.step += 1
        value = {name: _read(metrics.get(name), name) for name in (
            "logps/chosen", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl",
            "completion_length", "completion_length/chosen", "completion_length/rejected")}
        loss_value = _read(loss if loss is not None else metrics.get("loss"), "loss")
        length = _read(completion_length, "completion_length")
        if length is None:
            length = value["completion_length"]
        if length is None and value["completion_length/chosen"] is not None and value[
                "completion_length/rejected"] is not None:
            length = (value["completion_length/chosen"] + value["completion_length/rejected"]) / 2

        logps = self._record("logps/chosen", value["logps/chosen"])
        accuracy = self._record("rewards/accuracies", value["rewards/accuracies"])
        margins = self._record("rewards/margins", value["rewards/margins"])
        losses = self._record("loss", loss_value)
        lengths = self._record("completion_length", length)
        self._record("kl", self._kl_estimate(value, length))

        found: list[tuple[str, str]] = []
        found += self._collapse(logps)
        found += self._not_learning(accuracy)
        found += self._overfitting(accuracy, losses)
        found += self._margin_plateau(margins)
        found += self._kl(self._series["kl"])
        found += self._length(lengths)

        raised = []
        for kind, message in found:
            last = self._last_fired.get(kind)
            if last is not None and self.step - last < self.window:
                continue
            self._last_fired[kind] = self.step
            warning = PreferenceTrainingWarning(kind, self.step, f"step {self.step}: {message}")
            warnings.warn(warning, stacklevel=2)
            raised.append(warning)
        return raised

    # ------------------------------------------------------------------------------------------
    # The checks: each returns [(kind, message)] when its condition holds now.
    # ------------------------------------------------------------------------------------------

    def _warmed_up(self) -> bool:
        return self.step > self.warmup_steps

    def _collapse(self, logps: _Series) -> list[tuple[str, str]]:
        baseline, last = logps.baseline(), logps.last()
        if baseline is None or last is None or len(logps.recent) < 2 * self.window:
            return []
        if last >= baseline - self.collapse_drop * abs(baseline):
            return []
        return [("collapse", (
            f"logps/chosen fell from {baseline:.4g} to {last:.4g} (means of the first and the last "
            f"{self.window} steps): the policy is lowering the likelihood of the preferred answers "
            "(likelihood displacement). Raise beta, add an NLL term on the chosen answers (RPO, cpo_alpha), "
            "use a loss that anchors the chosen likelihood (IPO, apo_down), or lower the learning rate."
        ))]

    def _not_learning(self, accuracy: _Series) -> list[tuple[str, str]]:
        last = accuracy.last()
        if not self._warmed_up() or last is None or abs(last - 0.5) > self.not_learning_band:
            return []
        return [("not_learning", (
            f"rewards/accuracies is {last:.3f} over the last {self.window} steps, after {self.warmup_steps} "
            "warm-up steps: the policy does not separate chosen from rejected. Raise the learning rate, check "
            "that the pairs are neither swapped nor identical; a very small beta also makes the gradients small."
        ))]

    def _overfitting(self, accuracy: _Series, losses: _Series) -> list[tuple[str, str]]:
        last_accuracy, last_loss = accuracy.last(), losses.last()
        if last_accuracy is None or last_loss is None:
            return []
        if last_accuracy <= self.overfit_accuracy or last_loss >= self.overfit_loss:
            return []
        return [("overfitting", (
            f"rewards/accuracies is {last_accuracy:.4f} with a loss of {last_loss:.3g} over the last "
            f"{self.window} steps: every pair is separated and the margins are pushed without bound "
            "(overfitting). Raise beta, switch to IPO (a finite margin target), add label smoothing, "
            "lower the learning rate or stop earlier."
        ))]

    def _margin_plateau(self, margins: _Series) -> list[tuple[str, str]]:
        previous, last = margins.previous(), margins.last()
        if not self._warmed_up() or previous is None or last - previous > self.margin_min_growth:
            return []
        return [("margin_plateau", (
            f"rewards/margins stopped growing: {previous:.4g} then {last:.4g} (means of the last two windows "
            f"of {self.window} steps). The loss has saturated or the learning rate has decayed: with low "
            "accuracy raise the learning rate or lower beta; with high accuracy the run has converged."
        ))]

    def _kl_estimate(self, value: dict[str, float | None], length: float | None) -> float | None:
        if value["kl"] is not None:
            kl = value["kl"]
        elif self.beta is not None and value["rewards/chosen"] is not None and value["rewards/rejected"] is not None:
            kl = (abs(value["rewards/chosen"]) + abs(value["rewards/rejected"])) / (2 * self.beta)
        else:
            return None
        return kl / length if length is not None and length > 0 else kl

    def _kl(self, kl: _Series) -> list[tuple[str, str]]:
        last = kl.last()
        if last is None or last <= self.kl_threshold:
            return []
        unit = "nats per token" if self._series["completion_length"].last() is not None else "nats per sequence"
        return [("kl", (
            f"the estimated KL to the reference is {last:.3g} {unit} over the last {self.window} steps, "
            f"above {self.kl_threshold:g}: the policy has drifted where its implicit reward is unreliable "
            "(reward hacking, degenerate text). Raise beta, lower the learning rate, or switch to IPO."
        ))]

    def _length(self, lengths: _Series) -> list[tuple[str, str]]:
        baseline, last = lengths.baseline(), lengths.last()
        if baseline is None or last is None or baseline <= 0 or len(lengths.recent) < 2 * self.window:
            return []
        change = last / baseline - 1.0
        if abs(change) <= self.length_drift:
            return []
        return [("length_drift", (
            f"the mean completion length drifted {change:+.0%} ({baseline:.1f} to {last:.1f} tokens, first "
            f"and last {self.window} steps): the policy may be exploiting length. Use a length-normalized "
            "loss (SimPO, IPO with lengths, sigmoid_norm), add a length penalty (R-DPO), or balance the "
            "lengths of chosen and rejected in the data."
        ))]
