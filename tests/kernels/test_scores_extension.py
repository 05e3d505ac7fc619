"""aql_kernels._C, the C++ eager route of cross_entropy_with_scores / softmax_scores for 2-D CPU logits:
both routes ("extension" and "python", the latter with the extension switched off) against the
float64 reference and F.cross_entropy's float64 gradient, bit for bit against each other, the C++
autograd node (what it saves, what it refuses), the fallback to the Python route for what the
extension does not cover (with the Python route's errors), and the loader's fallback when the
extension is missing or disabled."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import _native, backends
from aql_kernels import scores as S
from aql_kernels.scores import cross_entropy_with_scores, softmax_scores
from tests.kernels.test_scores import (IGNORE, TOLERANCES, _assert_scores_close, _expected, _random_logits,
                                       _random_targets)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ROUTES = ["extension", "python"]


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """The eager CPU route under test: "extension" (skipped where aql_kernels._C is unavailable) or
    "python" (the extension switched off)."""
    if request.param == "extension":
        if S._extension() is None:
            pytest.skip(f"aql_kernels._C is unavailable: {_native.EXTENSION.reason}")
    else:
        monkeypatch.setattr(S, "_extension_module", False)
    return request.param


def _node_name(loss: torch.Tensor) -> str:
    return type(loss.grad_fn).__name__ + ":" + loss.grad_fn.name()


def _assert_route(route: str, loss: torch.Tensor) -> None:
    """The loss came from the route under test (a C++ node, or the Python autograd.Function)."""
    name = _node_name(loss)
    if route == "extension":
        assert "CrossEntropyWithScores" in name and "BackwardCFunction" not in name, name
    else:
        assert "_CrossEntropyBackward" in name, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
def test_softmax_scores_match_float64_reference(route, dtype):
    atol, rtol = TOLERANCES[dtype]
    for n, v, stride in [(1, 1, None), (64, 10, None), (37, 17, 21), (5, 5001, None), (3, 4097, 4200)]:
        logits = _random_logits(n, v, dtype, "cpu", row_stride=stride)
        targets = _random_targets(n, v, "cpu")
        _assert_scores_close(softmax_scores(logits, targets), _expected(logits, targets), atol, rtol)
        got = softmax_scores(logits)
        assert got.loss is None and got.el2n is None
        _assert_scores_close(got, _expected(logits, None), atol, rtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_cross_entropy_forward_and_backward_match_torch(route, reduction, dtype):
    for n, v in [(64, 10), (1, 3), (19, 1003)]:
        base = _random_logits(n, v, dtype, "cpu").requires_grad_(True)
        targets = _random_targets(n, v, "cpu")
        logits = base * 1.0  # a non-leaf, as a model head's output
        loss, scores = cross_entropy_with_scores(logits, targets, reduction=reduction)
        _assert_route(route, loss)
        x64 = base.detach().double().requires_grad_(True)
        want = F.cross_entropy(x64, targets, ignore_index=IGNORE, reduction=reduction)
        torch.testing.assert_close(loss.double(), want, atol=2e-5 * n, rtol=2e-5)
        assert loss.dtype == torch.float32 and loss.requires_grad
        assert all(not t.requires_grad for t in scores)
        _assert_scores_close(scores, _expected(base.detach(), targets), *TOLERANCES[dtype])
        # "none": an incoming gradient of stride 0 (from .sum()) and one of random weights
        weights = torch.rand(n, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
        (loss * weights.float()).sum().backward()
        (want * weights).sum().backward()
        # (g (p_t - 1) carries the float32 lse's rounding, ~1e-6, when p_t nears 1 in short rows)
        atol, rtol = (4e-6, 1e-5) if dtype == torch.float32 else (1e-3, 1e-2)
        assert base.grad.dtype == dtype
        torch.testing.assert_close(base.grad.double(), x64.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_extension_gives_the_python_routes_results_bit_for_bit(monkeypatch, reduction):
    if S._extension() is None:
        pytest.skip(f"aql_kernels._C is unavailable: {_native.EXTENSION.reason}")
    n, v = 37, 10
    base = _random_logits(n, v, torch.float32, "cpu")
    targets = _random_targets(n, v, "cpu")

    def run():
        x = base.clone().requires_grad_(True)
        loss, scores = cross_entropy_with_scores(x, targets, reduction=reduction)
        weights = torch.linspace(0.5, 2.0, n) if reduction == "none" else torch.tensor(1.3)
        (loss * weights).sum().backward()
        with torch.no_grad():
            no_grad_loss, no_grad_scores = cross_entropy_with_scores(base, targets, reduction=reduction)
        return [loss.detach(), *scores, x.grad, no_grad_loss, *no_grad_scores, *softmax_scores(base, targets),
                *softmax_scores(base)[:5]], _node_name(loss)

    extension, extension_node = run()
    monkeypatch.setattr(S, "_extension_module", False)
    python, python_node = run()
    assert extension_node != python_node  # the two routes really ran
    for a, b in zip(extension, python, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


def test_all_rows_ignored(route):
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.full((3,), IGNORE)
    loss, _ = cross_entropy_with_scores(logits, targets)
    _assert_route(route, loss)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    loss.backward()
    assert (logits.grad == 0).all()  # 0 / 0 reaches no row: every row is ignored
    logits.grad = None
    loss_sum, _ = cross_entropy_with_scores(logits, targets, reduction="sum")
    loss_sum.backward()
    assert loss_sum == 0 and (logits.grad == 0).all()


def test_reduction_none_scores_carry_the_loss_detached(route):
    logits = _random_logits(6, 12, torch.float32, "cpu").requires_grad_(True)
    targets = _random_targets(6, 12, "cpu")
    loss, scores = cross_entropy_with_scores(logits, targets, reduction="none")
    _assert_route(route, loss)
    assert loss.shape == (6,) and loss.requires_grad and not scores.loss.requires_grad
    assert torch.equal(scores.loss, loss.detach())


def test_logits_changed_in_place_after_the_forward_raise(route):
    logits = _random_logits(4, 10, torch.float32, "cpu").requires_grad_(True)
    x = logits * 1.0
    loss, _ = cross_entropy_with_scores(x, _random_targets(4, 10, "cpu", ignore_some=False))
    _assert_route(route, loss)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_grad_no_node_is_recorded(route):
    logits = _random_logits(5, 10, torch.float32, "cpu").requires_grad_(True)
    targets = _random_targets(5, 10, "cpu")
    with torch.no_grad():
        loss, scores = cross_entropy_with_scores(logits, targets)
    assert loss.grad_fn is None and not loss.requires_grad and all(not t.requires_grad for t in scores)
    loss, _ = cross_entropy_with_scores(logits.detach(), targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits.detach().double(), targets, ignore_index=IGNORE),
                               atol=2e-5, rtol=2e-5)


def test_inputs_the_extension_does_not_cover_take_the_python_route(route):
    # int32 targets, transposed and expanded logits, an empty batch, the loss options: the same
    # results as the Python route computes them (against the reference), and its errors
    v = 10
    targets = _random_targets(6, v, "cpu")
    cases = [
        (_random_logits(6, v, torch.float32, "cpu"), targets.int()),
        (_random_logits(v, 6, torch.float32, "cpu").t(), targets),
        (_random_logits(1, v, torch.float32, "cpu").expand(6, v), targets),
    ]
    for logits, t in cases:
        x = logits.clone().requires_grad_(True) if logits.is_contiguous() else logits.detach().requires_grad_(True)
        loss, scores = cross_entropy_with_scores(x, t)
        _assert_route("python", loss)  # whatever the route under test: not covered
        _assert_scores_close(scores, _expected(logits.detach(), t), *TOLERANCES[torch.float32])
        _assert_scores_close(softmax_scores(logits, t), _expected(logits, t), *TOLERANCES[torch.float32])
    logits = _random_logits(6, v, torch.float32, "cpu").requires_grad_(True)
    for options in ({"label_smoothing": 0.1}, {"weight": torch.rand(v)}, {"inplace_backward": False, "label_smoothing": 0.0}):
        loss, _ = cross_entropy_with_scores(logits * 1.0, targets, **options)
        want = F.cross_entropy(logits.detach().double(), targets, ignore_index=IGNORE,
                               **{k: (w.double() if isinstance(w, torch.Tensor) else w) for k, w in options.items()
                                  if k != "inplace_backward"})
        torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=2e-5)
    empty = cross_entropy_with_scores(torch.randn(0, v, requires_grad=True), torch.zeros(0, dtype=torch.int64),
                                      reduction="sum")[0]
    assert empty == 0
    with pytest.raises(ValueError, match=r"aql_kernels\.\w+: target 10 of row 2 is outside \[0, 10\)"):
        cross_entropy_with_scores(logits, torch.tensor([0, 1, 10, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"softmax_scores: target -1 of row 0 is outside \[0, 10\)"):
        softmax_scores(logits.detach(), torch.tensor([-1, 1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        cross_entropy_with_scores(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got None"):
        cross_entropy_with_scores(logits, targets, reduction=None)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got bool"):
        cross_entropy_with_scores(logits, targets, ignore_index=True)
    with pytest.raises(TypeError, match=r"label_smoothing must be a float, got bool"):
        cross_entropy_with_scores(logits, targets, label_smoothing=False)
    with pytest.raises(ValueError, match=r"ignore_index must be in \[-9223372036854775808, 9223372036854775807\]"):
        softmax_scores(logits.detach(), targets, ignore_index=2**63)


def test_backends_report_the_extension():
    status = backends()["cpu_extension"]
    if _native.EXTENSION.module() is None:
        assert not status.available and status.detail == _native.EXTENSION.reason != ""
    else:
        assert status.available and status.detail.endswith(".so")


_DISABLED_SCRIPT = r"""
import torch, aql_kernels
from aql_kernels import scores
status = aql_kernels.backends()["cpu_extension"]
loss, _ = aql_kernels.cross_entropy_with_scores(torch.randn(4, 6, requires_grad=True), torch.tensor([0, 1, 2, 3]))
loss.backward()
print(status.available, status.detail, "|", loss.grad_fn.name())
"""


def test_a_disabled_or_missing_extension_falls_back(tmp_path):
    # in fresh processes: AQL_TORCH_EXTENSION=0, and a module name that does not import
    done = subprocess.run([sys.executable, "-c", _DISABLED_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={"AQL_TORCH_EXTENSION": "0", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False disabled by AQL_TORCH_EXTENSION=0 |") and "CrossEntropyBackward" in done.stdout
    missing = _native.TorchExtension("aql_kernels._no_such_extension")
    assert missing.module() is None and "does not import" in missing.reason and "make native" in missing.reason


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sequences_match_torch(route, shift, reduction):
    # [B, T, V] logits reach the C++ route as [B * T, V] rows (shift: the targets moved left by one,
    # ignore_index at each sequence's end); the loss and its gradient against F.cross_entropy in float64
    b, t, v = 3, 9, 17
    base = _random_logits(b * t, v, torch.float32, "cpu").view(b, t, v).requires_grad_(True)
    targets = _random_targets(b * t, v, "cpu").view(b, t)
    loss, scores = cross_entropy_with_scores(base * 1.0, targets, shift=shift, reduction=reduction, per_sample="sum")
    node = loss.grad_fn if reduction != "none" or not shift else loss.grad_fn.next_functions[0][0]  # (a slice after it)
    while node is not None and "CrossEntropy" not in node.name():
        node = node.next_functions[0][0] if node.next_functions else None
    assert node is not None and (("CrossEntropyWithScores" in node.name()) == (route == "extension")), node
    x64 = base.detach().double().requires_grad_(True)
    rows, row_targets = (x64[:, :-1], targets[:, 1:]) if shift else (x64, targets)
    want = F.cross_entropy(rows.reshape(-1, v), row_targets.reshape(-1), ignore_index=IGNORE, reduction=reduction)
    torch.testing.assert_close(loss.double(), want, atol=2e-5 * b * t, rtol=2e-5)
    weights = torch.rand(want.shape, dtype=torch.float64)
    (loss * weights.float()).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(base.grad.double(), x64.grad, atol=4e-6, rtol=1e-5)
    # per-sample sums of the per-position statistics
    positions = _expected(rows.detach().reshape(-1, v).float(), row_targets.reshape(-1))
    valid = (row_targets != IGNORE).double()
    torch.testing.assert_close(scores.loss.double(), (positions.loss.view(b, -1) * valid).sum(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores.entropy.double(), (positions.entropy.view(b, -1) * valid).sum(1), atol=1e-4, rtol=1e-5)


def test_sequences_give_the_python_routes_results_bit_for_bit(monkeypatch):
    if S._extension() is None:
        pytest.skip(f"aql_kernels._C is unavailable: {_native.EXTENSION.reason}")
    b, t, v = 4, 7, 30
    base = _random_logits(b * t, v, torch.float32, "cpu").view(b, t, v)
    targets = _random_targets(b * t, v, "cpu").view(b, t)

    def run():
        out = []
        for shift, reduction, per_sample in [(True, "mean", None), (False, "none", "none"), (True, "none", "sum")]:
            x = base.clone().requires_grad_(True)
            loss, scores = cross_entropy_with_scores(x, targets, shift=shift, reduction=reduction, per_sample=per_sample)
            loss.sum().backward()
            out += [loss.detach(), x.grad, *(f for f in scores if f is not None)]
        return out

    extension = run()
    monkeypatch.setattr(S, "_extension_module", False)
    python = run()
    for a, c in zip(extension, python, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c)
