"""The end-to-end modules against a plain-PyTorch computation of the same loss from the logits
(log_softmax in float64, then the reference loss formulas), forward, gradients and metrics."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backend, random_labels, random_logits

from prefopt import losses
from prefopt.nn import DPOLoss, IPOLoss, KTOLoss, LMHeadInput, ORPOLoss, SimPOLoss

PAIRS, LENGTH, VOCAB = 3, 7, 37


def batch(seed: int, rows: int = 2 * PAIRS, empty_completion: bool = True):
    g = torch.Generator().manual_seed(seed)
    logits = random_logits((rows, LENGTH, VOCAB), torch.float32, generator=g)
    labels = random_labels((rows, LENGTH), VOCAB, ignored_fraction=0.2, generator=g)
    labels[:, :2] = -100  # the prompt
    labels[:, -1] = labels[:, -1].clamp(min=0)  # every completion scores at least one token...
    if empty_completion:
        labels[0, 2:] = -100  # ...but this chosen one, which has none at all
    return logits, labels


def plain(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """Per-sequence sums, token counts, and summed mean-logit and entropy, in float64."""
    z = logits.double() / temperature
    log_p = F.log_softmax(z, dim=-1)
    scored = labels != -100
    token_logps = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return (
        torch.where(scored, token_logps, zero).sum(-1),
        scored.sum(-1),
        torch.where(scored, z.mean(-1), zero).sum(-1).detach(),
        torch.where(scored, entropy, zero).sum(-1).detach(),
    )


def paired_metrics(mean_logits, entropy, tokens):
    c, r = slice(0, PAIRS), slice(PAIRS, None)
    return {
        "logits/chosen": mean_logits[c].sum() / tokens[c].sum(),
        "logits/rejected": mean_logits[r].sum() / tokens[r].sum(),
        "entropy": entropy.sum() / tokens.sum(),
        "completion_length/chosen": tokens[c].double().mean(),
        "completion_length/rejected": tokens[r].double().mean(),
    }


def check(module_result, expected_loss, expected_metrics, logits_leaf, expected_grad):
    loss, metrics = module_result
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-6)
    assert sorted(metrics) == sorted(expected_metrics), set(metrics) ^ set(expected_metrics)
    for name, value in expected_metrics.items():
        assert metrics[name].shape == () and not metrics[name].requires_grad, name
        torch.testing.assert_close(metrics[name].double(), value.double(), rtol=1e-5, atol=1e-5, msg=name)
    (grad,) = torch.autograd.grad(loss, logits_leaf)
    scale = expected_grad.norm()
    assert float((grad.double() - expected_grad).norm() / scale) < 1e-5


# ----------------------------------------------------------------------------------------------
# Pairwise modules.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["logps", "logits"])
@pytest.mark.parametrize("loss_type", ["sigmoid", ["hinge", "ipo", "sigmoid_norm"], "aot", ["sigmoid", "sft"]])
def test_dpo_module_matches_plain_pytorch(backend, loss_type, reference):
    logits, labels = batch(1)
    ref_logits, _ = batch(2)
    margin = torch.tensor([0.1, -0.2, 0.3], device=DEVICE) if loss_type == "sigmoid" else None
    ref_input = {"ref_logps": plain(ref_logits, labels)[0].float()} if reference == "logps" else {
        "ref_logits": ref_logits}
    module = DPOLoss(0.2, loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, temperature=0.8,
                     backend=backend)
    leaf = logits.clone().requires_grad_()
    result = module(leaf, labels, margin=margin, **ref_input)

    oracle = logits.double().requires_grad_()
    logps, tokens, mean_logits, entropy = plain(oracle, labels, temperature=0.8)
    ref = plain(ref_logits, labels, temperature=0.8)[0] if reference == "logits" else ref_input["ref_logps"].double()
    out, metrics = losses.dpo_loss(
        logps[:PAIRS], logps[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.2, loss_type=loss_type,
        label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, chosen_lengths=tokens[:PAIRS],
        rejected_lengths=tokens[PAIRS:], margin=None if margin is None else margin.double(),
        backend="reference", return_metrics=True,
    )
    metrics.update(paired_metrics(mean_logits, entropy, tokens))
    check(result, out.loss, metrics, leaf, torch.autograd.grad(out.loss, oracle)[0])


@pytest.mark.parametrize("length_normalized", [True, False])
def test_ipo_module(backend, length_normalized):
    logits, labels = batch(3)
    ref_logps = plain(batch(4)[0], labels)[0].float()
    leaf = logits.clone().requires_grad_()
    result = IPOLoss(0.5, length_normalized=length_normalized, backend=backend)(leaf, labels, ref_logps=ref_logps)

    oracle = logits.double().requires_grad_()
    logps, tokens, mean_logits, entropy = plain(oracle, labels)
    lengths = {"chosen_lengths": tokens[:PAIRS], "rejected_lengths": tokens[PAIRS:]} if length_normalized else {}
    ref = ref_logps.double()
    out, metrics = losses.ipo_loss(logps[:PAIRS], logps[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.5,
                                   return_metrics=True, **lengths)
    metrics.update(paired_metrics(mean_logits, entropy, tokens))
    check(result, out.loss, metrics, leaf, torch.autograd.grad(out.loss, oracle)[0])


def test_simpo_module(backend):
    logits, labels = batch(5)
    leaf = logits.clone().requires_grad_()
    result = SimPOLoss(2.5, 0.3, label_smoothing=0.05, backend=backend)(leaf, labels)

    oracle = logits.double().requires_grad_()
    logps, tokens, mean_logits, entropy = plain(oracle, labels)
    out, metrics = losses.simpo_loss(logps[:PAIRS], logps[PAIRS:], tokens[:PAIRS], tokens[PAIRS:], beta=2.5,
                                     gamma=0.3, label_smoothing=0.05, return_metrics=True)
    metrics.update(paired_metrics(mean_logits, entropy, tokens))
    check(result, out.loss, metrics, leaf, torch.autograd.grad(out.loss, oracle)[0])


def test_orpo_module(backend):
    # An empty completion would average to log p = 0, whose log-odds are clamped at a value
    # that depends on the dtype (see orpo_loss); the float32 and float64 paths would differ.
    logits, labels = batch(6, empty_completion=False)
    leaf = logits.clone().requires_grad_()
    result = ORPOLoss(0.3, backend=backend)(leaf, labels)

    oracle = logits.double().requires_grad_()
    logps, tokens, mean_logits, entropy = plain(oracle, labels)
    average = logps / tokens.clamp(min=1)
    # TRL's NLL: cross-entropy over the chosen sequences' scored tokens.
    nll = F.cross_entropy(oracle[:PAIRS].reshape(-1, VOCAB), labels[:PAIRS].reshape(-1), ignore_index=-100)
    out, metrics = losses.orpo_loss(average[:PAIRS], average[PAIRS:], beta=0.3, chosen_nll=nll,
                                    return_metrics=True)
    metrics.update(paired_metrics(mean_logits, entropy, tokens))
    check(result, out.loss, metrics, leaf, torch.autograd.grad(out.loss, oracle)[0])

    logits, labels = batch(6)
    leaf = logits.clone().requires_grad_()
    loss, _ = ORPOLoss(0.3, backend=backend)(leaf, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()


# ----------------------------------------------------------------------------------------------
# KTO.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_as", ["logits", "logps"])
def test_kto_module(backend, kl_as):
    logits, labels = batch(7, rows=5)
    ref_logits, _ = batch(8, rows=5)
    kl_logits, kl_labels = batch(9, rows=4)
    desirable = torch.tensor([True, False, True, True, False], device=DEVICE)
    # A sharper reference puts less mass on the (random) labels: the KL estimate is positive and
    # survives kto_kl's clamp at 0.
    kl_ref_logits = 1.1 * kl_logits
    if kl_as == "logits":
        kl_inputs = {"kl_logits": kl_logits, "ref_kl_logits": kl_ref_logits, "kl_labels": kl_labels}
    else:
        kl_inputs = {"kl_logps": plain(kl_logits, kl_labels)[0].float(),
                     "ref_kl_logps": plain(kl_ref_logits, kl_labels)[0].float()}
    leaf = logits.clone().requires_grad_()
    module = KTOLoss(0.2, desirable_weight=1.2, undesirable_weight=0.8, backend=backend)
    result = module(leaf, labels, desirable, ref_logits=ref_logits, **kl_inputs)

    oracle = logits.double().requires_grad_()
    logps, tokens, mean_logits, entropy = plain(oracle, labels)
    kl = losses.kto_kl(plain(kl_logits, kl_labels)[0], plain(kl_ref_logits, kl_labels)[0])
    assert kl > 1.0
    out, metrics = losses.kto_loss(logps, plain(ref_logits, labels)[0], desirable, kl=kl, beta=0.2,
                                   desirable_weight=1.2, undesirable_weight=0.8, return_metrics=True)
    d, u = desirable, ~desirable
    metrics.update({
        "logits/chosen": mean_logits[d].sum() / tokens[d].sum(),
        "logits/rejected": mean_logits[u].sum() / tokens[u].sum(),
        "entropy": entropy.sum() / tokens.sum(),
        "completion_length/chosen": tokens[d].double().mean(),
        "completion_length/rejected": tokens[u].double().mean(),
        "kl": kl,
    })
    check(result, out.loss, metrics, leaf, torch.autograd.grad(out.loss, oracle)[0])


def test_kto_apo_zero_unpaired_takes_no_kl(backend):
    logits, labels = batch(11, rows=4)
    ref_logps = plain(batch(12, rows=4)[0], labels)[0].float()
    desirable = torch.tensor([True, False, False, True], device=DEVICE)
    module = KTOLoss(loss_type="apo_zero_unpaired", backend=backend)
    loss, metrics = module(logits, labels, desirable, ref_logps=ref_logps)
    expected = losses.kto_loss(plain(logits, labels)[0], ref_logps.double(), desirable, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(loss.double(), expected.loss, rtol=1e-5, atol=1e-6)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="kl_logps.*apo_zero_unpaired"):
        module(logits, labels, desirable, ref_logps=ref_logps, kl_logps=ref_logps)


# ----------------------------------------------------------------------------------------------
# The LM head's inputs in place of logits.
# ----------------------------------------------------------------------------------------------

HIDDEN = 12


def lm_head_problem(seed: int, rows: int):
    """hidden [rows, T, H], weight [V, H], bias [V], labels [rows, T] as ``batch`` scores them."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, LENGTH, HIDDEN, generator=g).to(DEVICE)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(DEVICE)
    bias = torch.randn(VOCAB, generator=g).to(DEVICE)
    _, labels = batch(seed, rows)
    return hidden, weight, bias, labels


def explicit_logits(hidden, weight, bias, logit_scale, softcap):
    x = logit_scale * F.linear(hidden, weight, bias)
    return softcap * torch.tanh(x / softcap)


def kto_call(module, scores, labels, reference, kl_scores, kl_labels):
    desirable = torch.tensor([True, False, True, True], device=DEVICE)
    return module(scores, labels, desirable, ref_logits=reference, kl_logits=kl_scores, ref_kl_logits=reference,
                  kl_labels=kl_labels)


@pytest.mark.parametrize("linear_backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("make", [
    lambda b: DPOLoss(0.2, ["sigmoid", "ipo"], temperature=0.8, backend=b),
    lambda b: IPOLoss(0.3, backend=b),
    lambda b: SimPOLoss(backend=b),
    lambda b: ORPOLoss(backend=b),
    lambda b: KTOLoss(0.2, backend=b),
], ids=["dpo", "ipo", "simpo", "orpo", "kto"])
def test_lm_head_inputs_match_their_explicit_logits(make, linear_backend):
    """Loss, metrics and the gradients of hidden, weight and bias agree with the same module fed
    the logits computed explicitly (and differentiated by autograd) from the same head."""
    module = make(available_backend(linear_backend))
    kto = isinstance(module, KTOLoss)
    rows = 4 if kto else 2 * PAIRS
    hidden, weight, bias, labels = lm_head_problem(21, rows)
    ref_hidden, _, _, _ = lm_head_problem(22, rows)
    head = {"logit_scale": 0.7, "softcap": 4.0}
    results = []
    for explicit in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if explicit:
            scores = explicit_logits(*leaves, **head)
            reference = explicit_logits(ref_hidden, weight, bias, **head)
            module.backend = "torch"
        else:
            scores = LMHeadInput(*leaves, **head)
            reference = LMHeadInput(ref_hidden, weight, bias, **head)
            module.backend = linear_backend
        if kto:
            loss, metrics = kto_call(module, scores, labels, reference, reference, labels)
        elif isinstance(module, DPOLoss):
            loss, metrics = module(scores, labels, ref_logits=reference)
        else:
            loss, metrics = module(scores, labels)
        results.append((loss, metrics, torch.autograd.grad(loss, leaves)))
    (loss, metrics, grads), (expected_loss, expected_metrics, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert sorted(metrics) == sorted(expected_metrics)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for grad, expected in zip(grads, expected_grads):
        assert float((grad - expected).norm() / expected.norm()) < 1e-5


def test_bad_lm_head_inputs():
    hidden, weight, bias, labels = lm_head_problem(23, 2 * PAIRS)
    ref_logps = torch.zeros(2 * PAIRS, device=DEVICE)
    dpo = DPOLoss()
    cases = [
        (ValueError, r"logits\.hidden.*shape", LMHeadInput(hidden[0], weight), labels),
        (ValueError, r"logits\.weight.*shape", LMHeadInput(hidden, weight[:, 1:]), labels),
        (TypeError, r"logits\.weight.*dtype", LMHeadInput(hidden, weight.double()), labels),
        (ValueError, r"logits\.bias.*shape", LMHeadInput(hidden, weight, bias[1:]), labels),
        (ValueError, r"logits\.logit_scale", LMHeadInput(hidden, weight, logit_scale=0.0), labels),
        (ValueError, r"logits\.softcap", LMHeadInput(hidden, weight, softcap=-1.0), labels),
        (ValueError, "labels.*shape", LMHeadInput(hidden, weight), labels[:, 1:]),
    ]
    for error, match, scores, scored_labels in cases:
        with pytest.raises(error, match=match):
            dpo(scores, scored_labels, ref_logps=ref_logps)
    with pytest.raises(ValueError, match="ref_logits.hidden"):
        dpo(LMHeadInput(hidden, weight), labels, ref_logits=LMHeadInput(hidden[:, 1:], weight))
    # The expected layout reads as the logits' with H for V, whatever text follows the shape.
    with pytest.raises(ValueError, match=r"^logits\.hidden must be a tensor of shape \[2B, T, H\] \(\[chosen; rejected\]\), "
                                         r"got \(\d+, \d+\)$"):
        dpo(LMHeadInput(hidden[0], weight), labels, ref_logps=ref_logps)


# ----------------------------------------------------------------------------------------------
# What the modules promise beyond the numbers.
# ----------------------------------------------------------------------------------------------


def test_reference_logits_get_no_gradient_and_inplace_backward_agrees(backend):
    logits, labels = batch(13)
    ref_logits = batch(14)[0].requires_grad_()
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        loss, _ = DPOLoss(backend=backend, inplace_backward=inplace)(leaf * 1.0, labels, ref_logits=ref_logits)
        loss.backward()
        grads.append(leaf.grad)
    assert ref_logits.grad is None
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("scores", ["logits", "lm_head"])
def test_compile_fullgraph_dpo_step(backend, scores):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(15)
    head = torch.nn.Linear(16, VOCAB, bias=False).to(DEVICE)
    hidden = torch.randn(2 * PAIRS, LENGTH + 1, 16, generator=g).to(DEVICE)
    labels = random_labels((2 * PAIRS, LENGTH), VOCAB, generator=g)
    labels[:, :2] = -100
    ref_logps = -20 * torch.rand(2 * PAIRS, generator=g).to(DEVICE)
    dpo = DPOLoss(0.1, backend=backend)

    def step(hidden):
        policy = head(hidden)[:, :-1] if scores == "logits" else LMHeadInput(hidden[:, :-1], head.weight)
        loss, metrics = dpo(policy, labels, ref_logps=ref_logps)
        return loss, metrics["rewards/accuracies"], metrics["logits/chosen"], metrics["entropy"]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for function in (step, compiled):
        head.weight.grad = None
        outputs = function(hidden)
        outputs[0].backward()
        results.append((*outputs, head.weight.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_dpo_step():
    logits, labels = batch(16)
    ref_logps = plain(batch(17)[0], labels)[0].float()
    static_logits = logits.clone().requires_grad_()
    dpo = DPOLoss(backend="triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile the kernels outside the capture
        for _ in range(2):
            static_logits.grad = None
            dpo(static_logits, labels, ref_logps=ref_logps)[0].backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_logits.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            loss, metrics = dpo(static_logits, labels, ref_logps=ref_logps)
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    new_logits = batch(18)[0]
    with torch.no_grad():
        static_logits.copy_(new_logits)
    graph.replay()
    eager_leaf = new_logits.clone().requires_grad_()
    eager_loss, eager_metrics = DPOLoss(backend="triton")(eager_leaf, labels, ref_logps=ref_logps)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(metrics["rewards/margins"], eager_metrics["rewards/margins"])
    torch.testing.assert_close(static_logits.grad, eager_leaf.grad)


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument, before any kernel runs.
# ----------------------------------------------------------------------------------------------


def test_bad_module_inputs():
    logits, labels = batch(19)
    ref_logps = torch.zeros(2 * PAIRS, device=DEVICE)
    dpo = DPOLoss()
    cases = [
        (ValueError, "logits.*even", dict(logits=logits[:5], labels=labels[:5], ref_logps=ref_logps[:5])),
        (ValueError, "logits.*shape", dict(logits=logits[0], labels=labels[0], ref_logps=ref_logps)),
        (TypeError, "logits", dict(logits=logits.tolist(), labels=labels, ref_logps=ref_logps)),
        (ValueError, "labels", dict(logits=logits, labels=labels[:, 1:], ref_logps=ref_logps)),
        (TypeError, "labels", dict(logits=logits, labels=labels.float(), ref_logps=ref_logps)),
        (ValueError, "exactly one of ref_logps", dict(logits=logits, labels=labels)),
        (ValueError, "exactly one of ref_logps",
         dict(logits=logits, labels=labels, ref_logps=ref_logps, ref_logits=logits)),
        (ValueError, "ref_logps.*shape", dict(logits=logits, labels=labels, ref_logps=ref_logps[:PAIRS])),
        (TypeError, "ref_logps.*dtype", dict(logits=logits, labels=labels, ref_logps=ref_logps.double())),
        (ValueError, "ref_logits.*shape", dict(logits=logits, labels=labels, ref_logits=logits[:, 1:])),
        (TypeError, "ref_logits", dict(logits=logits, labels=labels, ref_logits=logits.long())),
        (ValueError, "margin.*shape", dict(logits=logits, labels=labels, ref_logps=ref_logps, margin=ref_logps)),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            dpo(kwargs.pop("logits"), kwargs.pop("labels"), **kwargs)
    with pytest.raises(ValueError, match="labels"):
        bad = labels.clone()
        bad[1, 3] = VOCAB
        SimPOLoss()(logits, bad)


def test_bad_kto_inputs():
    logits, labels = batch(20, rows=4)
    ref = torch.zeros(4, device=DEVICE)
    d = torch.tensor([True, False, True, False], device=DEVICE)
    kto = KTOLoss()
    with pytest.raises(TypeError, match="desirable"):
        kto(logits, labels, d.long(), ref_logps=ref, kl_logps=ref, ref_kl_logps=ref)
    with pytest.raises(ValueError, match="desirable"):
        kto(logits, labels, d[:3], ref_logps=ref, kl_logps=ref, ref_kl_logps=ref)
    with pytest.raises(ValueError, match="kl_logps or kl_logits"):
        kto(logits, labels, d, ref_logps=ref)
    with pytest.raises(TypeError, match="kl_labels"):
        kto(logits, labels, d, ref_logps=ref, kl_logits=logits, ref_kl_logps=ref)
    with pytest.raises(ValueError, match="kl_labels"):
        kto(logits, labels, d, ref_logps=ref, kl_logps=ref, ref_kl_logps=ref, kl_labels=labels)
    with pytest.raises(ValueError, match="ref_kl_logps.*shape"):
        kto(logits, labels, d, ref_logps=ref, kl_logps=ref, ref_kl_logps=ref[:3])
    with pytest.raises(ValueError, match="ref_kl_logps.*shape"):
        kto(logits, labels, d, ref_logps=ref, kl_logits=logits[:2], kl_labels=labels[:2], ref_kl_logps=ref)
    with pytest.raises(TypeError, match="kl_logits"):
        kto(logits, labels, d, ref_logps=ref, kl_logits=[1.0], kl_labels=labels, ref_kl_logps=ref)
    with pytest.raises(TypeError, match="kl_labels"):
        kto(logits, labels, d, ref_logps=ref, kl_logits=logits, kl_labels=labels.float(), ref_kl_logps=ref)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: DPOLoss(beta=0.0), ValueError, "beta"),
        (lambda: DPOLoss(loss_type="dpo"), ValueError, "loss_type.*sigmoid"),
        (lambda: DPOLoss(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (lambda: DPOLoss(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), ValueError, "loss_weights"),
        (lambda: DPOLoss(temperature=0.0), ValueError, "temperature"),
        (lambda: DPOLoss(backend="fast"), ValueError, "backend"),
        (lambda: DPOLoss(inplace_backward=1), TypeError, "inplace_backward"),
        (lambda: DPOLoss(ignore_index=None), TypeError, "ignore_index"),
        (lambda: IPOLoss(length_normalized="yes"), TypeError, "length_normalized"),
        (lambda: KTOLoss(loss_type="sigmoid"), ValueError, "loss_type.*apo_zero_unpaired"),
        (lambda: KTOLoss(undesirable_weight=-1.0), ValueError, "undesirable_weight"),
        (lambda: SimPOLoss(gamma=float("nan")), ValueError, "gamma"),
        (lambda: ORPOLoss(beta=-1.0), ValueError, "beta"),
    ],
)
def test_bad_module_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_dpo_module_trl_option_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"ld_alpha must be None or lie in \[0, 1\]"):
        DPOLoss(ld_alpha=1.5)
    with pytest.raises(TypeError, match="ld_alpha must be a real Python number"):
        DPOLoss(ld_alpha="0.5")
    with pytest.raises(TypeError, match="use_weighting must be a bool"):
        DPOLoss(use_weighting=1)
    with pytest.raises(ValueError, match=r"use_weighting cannot weigh loss_type \['aot'\]"):
        DPOLoss(loss_type="aot", use_weighting=True)
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        DPOLoss(f_divergence_type="chi2")
    with pytest.raises(ValueError, match="f_divergence_type='js_divergence' is only defined"):
        DPOLoss(loss_type="apo_zero", f_divergence_type="js_divergence")


@pytest.mark.parametrize("options", [{"use_weighting": True, "ld_alpha": 0.5, "f_divergence_type": "js_divergence"},
                                     {"ld_alpha": 0.2, "loss_type": ["ipo", "sft"]}], ids=["wpo-ld-js", "ld-sft"])
def test_dpo_module_trl_options_on_every_backend(backend, options):
    # The values are pinned against TRL in tests/test_trl_parity.py; here every backend gives them.
    logits, labels = batch(5)
    ref_logits, _ = batch(6)
    leaf = logits.clone().requires_grad_()
    loss, metrics = DPOLoss(0.3, backend=backend, **options)(leaf, labels, ref_logits=ref_logits)
    oracle = logits.double().requires_grad_()
    expected, expected_metrics = DPOLoss(0.3, backend="reference", **options)(oracle, labels,
                                                                             ref_logits=ref_logits.double())
    torch.testing.assert_close(loss.double().cpu(), expected.detach().cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0].double().cpu(),
                               torch.autograd.grad(expected, oracle)[0].cpu(), rtol=1e-4, atol=1e-6)
    for name, value in expected_metrics.items():
        torch.testing.assert_close(metrics[name].double().cpu(), value.detach().cpu(), rtol=1e-5, atol=1e-6)
