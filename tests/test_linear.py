"""The fused linear path against explicit float64 logits x = logit_scale * (hidden @ weight.T + bias):
values of every statistic and the gradients of hidden, weight and bias, for every backend.

Shapes stay small: under TRITON_INTERPRET=1 every kernel program runs as numpy code.
"""

import pytest
import torch
from conftest import (ALL_STATS, CUDA, DEVICE, TOLERANCE, available_backend, fixture_backend, random_labels,
                      relative_error)

import prefopt
from prefopt.backends import BackendUnavailableError, unavailable_reason
from prefopt.logprobs.linear import linear_sequence_logprobs, linear_token_logprobs, linear_token_stats

DIFFERENTIABLE = ("logps", "entropy", "mean_logits", "log_sum_sq_probs")
LINEAR_BACKENDS = ("triton", CUDA, "torch", "reference")


@pytest.fixture(params=LINEAR_BACKENDS)
def backend(request) -> str:
    return fixture_backend(request)


def random_problem(leading, hidden_size, vocab_size, dtype, *, bias=True, ignored_fraction=0.3, seed=0):
    """hidden [*leading, H], weight [V, H], bias [V] or None, labels [*leading]: fresh, never zeros,
    logits of a spread typical of language models."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*leading, hidden_size), generator=generator)
    weight = torch.randn((vocab_size, hidden_size), generator=generator) * (3.0 / hidden_size**0.5)
    bias_tensor = torch.randn(vocab_size, generator=generator) if bias else None
    labels = random_labels(tuple(leading), vocab_size, ignored_fraction, generator=generator)

    def place(t):
        return None if t is None else t.to(dtype).to(DEVICE)

    return place(hidden), place(weight), place(bias_tensor), labels


def explicit_stats(hidden, weight, bias, labels, *, logit_scale=1.0, stats=ALL_STATS, **kwargs):
    """The oracle: explicit float64 logits on CPU, then the float64 logits reference."""
    logits = hidden.double().cpu() @ weight.double().cpu().T
    if bias is not None:
        logits = logits + bias.double().cpu()
    return prefopt.token_stats(logits * logit_scale, labels.cpu(), stats=stats, backend="reference", **kwargs)


def run_both(hidden, weight, bias, labels, backend, *, stats=ALL_STATS, hidden_view=None, **kwargs):
    """Outputs and (grad_hidden, grad_weight, grad_bias) of ``backend`` and of the oracle under
    the same random upstream gradients. ``hidden_view`` maps the hidden leaf to the input."""
    view = hidden_view or (lambda h: h)
    generator = torch.Generator().manual_seed(1)
    labels_shape = view(hidden).shape[:-1]
    upstream = {name: torch.randn(labels_shape, generator=generator, dtype=torch.float64) for name in DIFFERENTIABLE}
    results = []
    for oracle in (True, False):
        leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if oracle:
            leaves = [t if t is None else t.detach().double().cpu().requires_grad_(True) for t in leaves]
            out = explicit_stats(view(leaves[0]), leaves[1], leaves[2], labels, stats=stats, **kwargs)
        else:
            out = linear_token_stats(view(leaves[0]), leaves[1], labels, bias=leaves[2], stats=stats,
                                     backend=backend, **kwargs)
        asked = [name for name in DIFFERENTIABLE if getattr(out, name) is not None]
        loss = sum((getattr(out, name).double().cpu() * upstream[name]).sum() for name in asked)
        inputs = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, inputs)
        results.append((out, grads, leaves))
    return results


def check(hidden, weight, bias, labels, backend, *, stats=ALL_STATS, hidden_view=None, **kwargs):
    (reference, reference_grads, _), (out, grads, leaves) = run_both(
        hidden, weight, bias, labels, backend, stats=stats, hidden_view=hidden_view, **kwargs)
    tolerance = TOLERANCE[hidden.dtype]
    for name in DIFFERENTIABLE:
        if getattr(reference, name) is None:
            continue
        value = getattr(out, name)
        assert value.dtype == (torch.float64 if backend == "reference" and hidden.dtype == torch.float64
                               else torch.float32)
        assert value.shape == labels.shape
        assert relative_error(value, getattr(reference, name)) <= tolerance, name
    if "is_top1" in stats:
        # Near-ties may round differently in low precision; exact agreement is asked of float32.
        if hidden.dtype == torch.float32:
            assert torch.equal(out.is_top1.cpu(), reference.is_top1)
    scored = labels != -100
    assert torch.all(out.logps[scored] <= 0)
    for grad, reference_grad, leaf in zip(grads, reference_grads, [t for t in leaves if t is not None]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        assert relative_error(grad, reference_grad) <= tolerance
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_explicit_logits(backend, dtype, with_bias):
    hidden, weight, bias, labels = random_problem((2, 5), 24, 37, dtype, bias=with_bias)
    check(hidden, weight, bias, labels, backend)


@pytest.mark.parametrize(("vocab_size", "hidden_size"), [(1, 5), (7, 1), (7, 17), (1003, 33), (301, 131)])
def test_odd_sizes(backend, vocab_size, hidden_size):
    # 1003 spans several vocabulary tiles, 131 several slices of H.
    hidden, weight, bias, labels = random_problem((3, 7), hidden_size, vocab_size, torch.float32, seed=vocab_size)
    check(hidden, weight, bias, labels, backend)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_peaked_rows_keep_relative_precision(backend, temperature):
    # p_max ~ 1: log p of the top token is tiny and must keep its relative precision.
    hidden, weight, bias, labels = random_problem((2, 4), 16, 300, torch.float32, seed=12)
    top = (hidden.double() @ weight.double().T + bias.double()).argmax(-1)
    labels = torch.where(labels == -100, labels, top)
    check(hidden * 4.0, weight, bias * 4.0, labels, backend, temperature=temperature, stats=("entropy",))


@pytest.mark.parametrize(("temperature", "softcap", "logit_scale"), [(0.7, None, 1.0), (1.0, 2.5, 1.0),
                                                                      (1.3, 4.0, 0.25), (1.0, None, 3.0)])
def test_temperature_softcap_and_logit_scale(backend, temperature, softcap, logit_scale):
    hidden, weight, bias, labels = random_problem((2, 6), 20, 41, torch.float32, seed=3)
    check(hidden, weight, bias, labels, backend, temperature=temperature, softcap=softcap, logit_scale=logit_scale)


def test_strided_hidden(backend):
    hidden, weight, bias, labels = random_problem((2, 7), 18, 29, torch.float32, seed=4)
    check(hidden, weight, bias, labels[:, :-1], backend, hidden_view=lambda h: h[:, :-1])


def test_ignored_rows_get_exact_zeros(backend):
    hidden, weight, bias, labels = random_problem((4, 32), 16, 23, torch.float32, seed=5)
    labels[:2] = -100  # a whole tile of 64 tokens ignored, as a prompt is
    labels[2, :7] = -100
    out, (grad_hidden, _, _) = check(hidden, weight, bias, labels, backend)
    ignored = labels == -100
    for name in ("logps", *ALL_STATS):
        assert not getattr(out, name)[ignored].any()
    assert not grad_hidden[ignored].any()


def test_every_row_ignored(backend):
    hidden, weight, bias, labels = random_problem((2, 5), 16, 19, torch.float32, ignored_fraction=1.0)
    out, grads = check(hidden, weight, bias, labels, backend)
    assert not out.logps.any() and not out.entropy.any() and not out.is_top1.any()
    for grad in grads:
        assert not grad.any()


@pytest.mark.parametrize("ignored_fraction", [0.3, 0.0])
def test_many_row_chunks_and_vocabulary_tiles(backend, monkeypatch, ignored_fraction):
    """Tile budgets shrunk so that the tiled backends take many chunks of rows and many vocabulary
    tiles, ragged at the ends; labels in every tile; with ignored rows, and with none."""
    monkeypatch.setattr(prefopt.logprobs.torch_backend, "MIN_CHUNK_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.torch_backend, "MAX_CHUNK_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.linear, "WEIGHT_TILE_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 4 * 301 * 7)
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_MULTIPLE", 1)
    hidden, weight, bias, labels = random_problem((3, 41), 17, 301, torch.bfloat16, seed=9,
                                                  ignored_fraction=ignored_fraction)
    check(hidden, weight, bias, labels, backend, softcap=5.0, logit_scale=0.5)


def test_rows_are_not_counted_while_a_cuda_graph_is_captured(backend, monkeypatch):
    """Counting the scored rows is a host round trip, which a CUDA graph cannot hold: while one
    is captured every row is multiplied instead, with the same results (exact zeros for ignored
    rows), also over many tiles."""
    if backend == "reference":
        pytest.skip("the reference multiplies every row anyway")

    def no_count(*args, **kwargs):
        raise AssertionError("the scored rows were counted during a capture")

    monkeypatch.setattr(prefopt.logprobs.linear, "_capturing", lambda labels: True)
    monkeypatch.setattr(torch.Tensor, "nonzero", no_count)
    monkeypatch.setattr(prefopt.logprobs.torch_backend, "MIN_CHUNK_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.torch_backend, "MAX_CHUNK_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.linear, "WEIGHT_TILE_BYTES", 4 * 301 * 5)
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 4 * 301 * 7)
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_MULTIPLE", 1)
    hidden, weight, bias, labels = random_problem((3, 41), 17, 301, torch.float32, seed=10, ignored_fraction=0.5)
    out, (grad_hidden, _, _) = check(hidden, weight, bias, labels, backend, softcap=5.0)
    assert not out.logps[labels == -100].any() and not grad_hidden[labels == -100].any()


@pytest.mark.gpu
@pytest.mark.parametrize(("linear_backend", "grad_filter_eps"),
                         [("triton", None), ("cuda", None), ("triton-fused", None), ("triton-fused", 2**-12)])
def test_cuda_graph_capture_of_forward_and_backward(linear_backend, grad_filter_eps):
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    available_backend("triton" if linear_backend == "triton-fused" else linear_backend)
    options = {"backend": linear_backend, "grad_filter_eps": grad_filter_eps}
    hidden, weight, bias, labels = random_problem((4, 64), 64, 1000, torch.bfloat16, seed=11, ignored_fraction=0.5)
    static_hidden = hidden.clone().requires_grad_(True)
    static_weight = weight.clone().requires_grad_(True)

    def step():
        logps = linear_sequence_logprobs(static_hidden, static_weight, labels, bias=bias, **options)
        logps.sum().backward()
        return logps

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile and load the kernels outside the capture
        for _ in range(2):
            static_hidden.grad = static_weight.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    static_hidden.grad = static_weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logps = step()
    new_hidden = random_problem((4, 64), 64, 1000, torch.bfloat16, seed=12)[0]
    with torch.no_grad():
        static_hidden.copy_(new_hidden)
    graph.replay()
    eager_hidden = new_hidden.clone().requires_grad_(True)
    eager_weight = weight.clone().requires_grad_(True)
    eager = linear_sequence_logprobs(eager_hidden, eager_weight, labels, bias=bias, **options)
    eager.sum().backward()
    torch.testing.assert_close(logps, eager)
    torch.testing.assert_close(static_hidden.grad, eager_hidden.grad)
    torch.testing.assert_close(static_weight.grad, eager_weight.grad)


def test_torch_backend_multiplies_only_scored_rows(monkeypatch):
    import prefopt.logprobs.linear

    hidden, weight, bias, labels = random_problem((4, 16), 16, 23, torch.float32, ignored_fraction=0.0, seed=12)
    multiplied_rows = []
    chunk_logits = prefopt.logprobs.linear._chunk_logits_

    def counting_chunk_logits(out, hidden_rows, *args):
        multiplied_rows.append(hidden_rows.shape[0])
        return chunk_logits(out, hidden_rows, *args)

    monkeypatch.setattr(prefopt.logprobs.linear, "_chunk_logits_", counting_chunk_logits)

    def rows_multiplied(labels: torch.Tensor) -> int:
        multiplied_rows.clear()
        leaf = hidden.clone().requires_grad_(True)
        linear_token_logprobs(leaf, weight, labels, bias=bias, backend="torch").sum().backward()
        return sum(multiplied_rows)

    half_ignored = labels.clone()
    half_ignored[:, ::2] = -100
    assert rows_multiplied(labels) == 2 * labels.numel()  # forward, and the backward's recomputation
    assert rows_multiplied(half_ignored) == labels.numel()
    assert rows_multiplied(torch.full_like(labels, -100)) == 0


def test_only_some_statistics(backend):
    hidden, weight, bias, labels = random_problem((2, 5), 16, 21, torch.float32, seed=6)
    out, _ = check(hidden, weight, bias, labels, backend, stats=("log_sum_sq_probs",))
    assert out.entropy is None and out.mean_logits is None and out.is_top1 is None
    check(hidden, weight, bias, labels, backend, stats=())


def test_is_top1_ties_go_to_the_earlier_token(backend):
    hidden = torch.ones(1, 3, 4, device=DEVICE)
    # Every logit equal: token 0 is the argmax, across vocabulary tiles and splits.
    weight = torch.ones(300, 4, device=DEVICE)
    labels = torch.tensor([[0, 1, 299]], device=DEVICE)
    out = linear_token_stats(hidden, weight, labels, stats=("is_top1",), backend=backend)
    assert out.is_top1.tolist() == [[True, False, False]]


def test_token_logprobs_and_entropy(backend):
    hidden, weight, bias, labels = random_problem((2, 5), 16, 21, torch.float32, seed=7)
    logps, entropy = linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, backend=backend)
    reference = explicit_stats(hidden, weight, bias, labels)
    assert relative_error(logps, reference.logps) <= 1e-5
    assert relative_error(entropy, reference.entropy) <= 1e-5
    assert linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend).shape == labels.shape


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(backend, average):
    hidden, weight, bias, labels = random_problem((3, 6), 16, 25, torch.float32, seed=8)
    labels[1] = -100  # a sequence without scored tokens: 0, never NaN
    logits = (hidden.double() @ weight.double().T + bias.double()) * 0.5
    expected = prefopt.sequence_logprobs(logits.cpu(), labels.cpu(), average=average, backend="reference")
    out = linear_sequence_logprobs(hidden, weight, labels, bias=bias, average=average, logit_scale=0.5,
                                   backend=backend)
    assert out.shape == (3,) and relative_error(out, expected) <= 1e-5

    cu_seqlens = torch.tensor([0, 4, 4, 18], device=DEVICE)
    packed = linear_sequence_logprobs(hidden.reshape(1, 18, 16), weight, labels.reshape(1, 18), bias=bias,
                                      average=average, cu_seqlens=cu_seqlens, logit_scale=0.5, backend=backend)
    expected = prefopt.sequence_logprobs(logits.reshape(18, 25).cpu(), labels.reshape(18).cpu(), average=average,
                                         cu_seqlens=cu_seqlens.cpu(), backend="reference")
    assert packed.shape == (3,) and relative_error(packed, expected) <= 1e-5


def test_frozen_weight_and_no_grad(backend):
    hidden, weight, bias, labels = random_problem((2, 5), 16, 21, torch.float32, seed=9)
    leaf = hidden.clone().requires_grad_(True)
    logps = linear_token_logprobs(leaf, weight, labels, bias=bias, backend=backend)
    (grad,) = torch.autograd.grad(logps.sum(), leaf)
    assert grad.shape == hidden.shape
    with torch.no_grad():
        logps = linear_token_logprobs(leaf, weight, labels, bias=bias, backend=backend)
    assert not logps.requires_grad


def test_deterministic(backend):
    hidden, weight, bias, labels = random_problem((3, 9), 20, 45, torch.bfloat16, seed=10)
    runs = [run_both(hidden, weight, bias, labels, backend)[1] for _ in range(2)]
    (first_out, first_grads, _), (second_out, second_grads, _) = runs
    for a, b in zip(first_out, second_out):
        assert torch.equal(a, b)
    for a, b in zip(first_grads, second_grads):
        assert torch.equal(a, b)


def compiled_loss(hidden, weight, bias, labels, backend):
    stats = linear_token_stats(hidden, weight, labels, bias=bias, stats=("entropy", "mean_logits", "is_top1"),
                               backend=backend)
    return stats.logps.sum() + 0.1 * stats.entropy.sum() + stats.mean_logits.mean(), stats.is_top1


def test_fullgraph_compile_matches_eager(backend):
    if backend == "reference":
        pytest.skip("the reference is plain PyTorch; the fused operators are what must trace")
    hidden, weight, bias, labels = random_problem((2, 6), 16, 37, torch.float32, seed=11)
    compiled = torch.compile(compiled_loss, backend="aot_eager", fullgraph=True)
    results = []
    for function in (compiled_loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss, is_top1 = function(*leaves, labels, backend)
        results.append((loss, is_top1, torch.autograd.grad(loss, leaves)))
    (eager_loss, eager_top1, eager_grads), (compiled_loss_value, compiled_top1, compiled_grads) = results
    torch.testing.assert_close(compiled_loss_value, eager_loss)
    assert torch.equal(compiled_top1, eager_top1)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_auto_and_unavailable_backends():
    hidden, weight, bias, labels = random_problem((2, 3), 8, 11, torch.float32)
    chosen = "triton" if DEVICE.type == "cuda" else "torch"
    expected = linear_token_logprobs(hidden, weight, labels, backend=chosen)
    assert torch.equal(linear_token_logprobs(hidden, weight, labels), expected)
    for backend in ("triton", "cuda"):
        if unavailable_reason(backend, DEVICE) is None:
            with pytest.raises(TypeError, match="hidden"):
                linear_token_logprobs(hidden.double(), weight.double(), labels, backend=backend)
        else:
            with pytest.raises(BackendUnavailableError, match=backend):
                linear_token_logprobs(hidden, weight, labels, backend=backend)


def test_float64_reference_and_torch():
    hidden, weight, bias, labels = random_problem((2, 4), 8, 13, torch.float64)
    check(hidden, weight, bias, labels, "reference")
    check(hidden, weight, bias, labels, "torch")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "hidden": a["hidden"].long()}, TypeError, "hidden"),
        (lambda a: {**a, "hidden": a["hidden"][..., :0]}, ValueError, "hidden"),
        (lambda a: {**a, "weight": a["weight"][:, :-1]}, ValueError, "weight"),
        (lambda a: {**a, "weight": a["weight"][None]}, ValueError, "weight"),
        (lambda a: {**a, "weight": a["weight"].double()}, TypeError, "weight"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, "bias"),
        (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias"),
        (lambda a: {**a, "labels": a["labels"][:, :-1]}, ValueError, "labels"),
        (lambda a: {**a, "labels": a["labels"].float()}, TypeError, "labels"),
        (lambda a: {**a, "labels": torch.full_like(a["labels"], 11)}, ValueError, "labels"),
        (lambda a: {**a, "temperature": 0.0}, ValueError, "temperature"),
        (lambda a: {**a, "softcap": -1.0}, ValueError, "softcap"),
        (lambda a: {**a, "logit_scale": 0.0}, ValueError, "logit_scale"),
        (lambda a: {**a, "logit_scale": float("inf")}, ValueError, "logit_scale"),
        (lambda a: {**a, "logit_scale": "2"}, TypeError, "logit_scale"),
        (lambda a: {**a, "stats": ("entropy", "perplexity")}, ValueError, "stats"),
        (lambda a: {**a, "backend": "jax"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(change, error, match):
    hidden, weight, bias, labels = random_problem((2, 3), 8, 11, torch.float32)
    arguments = change({"hidden": hidden, "weight": weight, "bias": bias, "labels": labels, "temperature": 1.0,
                        "softcap": None, "logit_scale": 1.0, "stats": ("entropy",), "backend": "torch"})
    with pytest.raises(error, match=match):
        linear_token_stats(arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("labels"), **arguments)


def test_bad_sequence_inputs():
    hidden, weight, bias, labels = random_problem((2, 3), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        linear_sequence_logprobs(hidden[0, 0], weight, labels[0, 0])
    with pytest.raises(ValueError, match="hidden"):
        linear_sequence_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_sequence_logprobs(hidden.reshape(6, 8), weight, labels.reshape(6), cu_seqlens=torch.tensor([0, 5]))
