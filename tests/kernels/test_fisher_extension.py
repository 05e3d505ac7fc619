"""aql_kernels.fisher_ema_ on its C++ eager route (aql_kernels._C) and on the Python route (the
extension switched off): both against the float64 spec, the extension really taking the call (the
Python route's checks never run), and every list it does not cover left to the Python route, which
validates, refuses overlaps with its messages, or runs its general path."""

from __future__ import annotations

import pytest
import torch

import aql_kernels
from aql_kernels import _native
from aql_kernels import fisher as fisher_module
from tests.kernels.test_fisher import _assert_matches, _expected, _overlaps

ROUTES = ["extension", "python"]


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    if request.param == "extension":
        if fisher_module._extension() is None:
            pytest.skip(f"aql_kernels._C is unavailable: {_native.EXTENSION.reason}")
        # the Python route's checks must not run at all on this route
        def unreachable(*args, **kwargs):
            raise AssertionError("the Python route ran")

        monkeypatch.setattr(fisher_module, "_collect", unreachable)
    else:
        monkeypatch.setattr(fisher_module, "_extension_module", False)
    return request.param


def _cnn_like(grad_dtype=torch.float32, none_at=()):
    shapes = [(32, 1, 5), (32,), (32, 32, 3), (32,), (32, 32, 3), (32,), (10, 32), (10,)]
    fisher = [torch.rand(shape) * 3 for shape in shapes]
    grads = [None if i in none_at else (torch.randn(shape) * 2).to(grad_dtype) for i, shape in enumerate(shapes)]
    return fisher, grads


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("decay, scale", [(0.0, 1.0), (0.95, 0.37), (0.999, 1024.0)])
def test_matches_float64_spec(route, grad_dtype, decay, scale):
    for none_at in ((), (1, 6)):
        fisher, grads = _cnn_like(grad_dtype, none_at)
        for step in range(3):  # fresh gradient tensors every step, as zero_grad(set_to_none=True) leaves them
            grads = [None if g is None else (torch.randn(g.shape) * 2).to(grad_dtype) for g in grads]
            expected = _expected(fisher, grads, decay, scale)
            aql_kernels.fisher_ema_(fisher, tuple(grads) if step == 1 else grads, decay, scale=scale)
            _assert_matches(fisher, expected)


def test_adversarial_values(route):
    fisher = [torch.tensor([0.0, -0.0, 1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0])]
    grads = [torch.tensor([float("nan"), float("inf"), -0.0, 1e20, -1e-30]), torch.tensor([-float("inf"), 0.0])]
    expected = _expected(fisher, grads, 0.5, 1.0)
    aql_kernels.fisher_ema_(fisher, grads, 0.5)
    _assert_matches(fisher, expected)


def test_all_none_changes_nothing(route):
    fisher, grads = _cnn_like(none_at=range(8))
    before = [f.clone() for f in fisher]
    aql_kernels.fisher_ema_(fisher, grads, 0.9)
    assert all(torch.equal(f, b) for f, b in zip(fisher, before))


def test_uncovered_lists_take_the_python_route(monkeypatch):
    # whatever the extension does not cover: the Python route's results and errors
    if fisher_module._extension() is None:
        pytest.skip(f"aql_kernels._C is unavailable: {_native.EXTENSION.reason}")
    calls = []
    collect = fisher_module._collect
    monkeypatch.setattr(fisher_module, "_collect", lambda *args: calls.append(1) or collect(*args))
    fisher, grads = _cnn_like()
    aql_kernels.fisher_ema_(fisher, grads, 0.9)
    assert calls == []  # covered: the extension ran
    base = torch.randn(32, 64)
    cases = [
        (lambda: ([torch.rand(32, 32)], [base[:, :32]], 0.9, 1.0)),        # a non-contiguous gradient
        (lambda: ([torch.rand(3)], [torch.ones(3)], 0, 1.0)),               # an int decay
        (lambda: ([torch.rand(3)], [torch.ones(3)], 0.5, 2)),               # an int scale
        (lambda: ([torch.rand(3), torch.rand(0)], [torch.ones(3), torch.ones(0)], 0.5, 1.0)),  # an empty tensor
        (lambda: ((x for x in [torch.rand(3)]), [torch.ones(3)], 0.5, 1.0)),  # not a list or tuple
    ]
    for make in cases:
        calls.clear()
        fisher, grads, decay, scale = make()
        if not isinstance(fisher, list):
            with pytest.raises(TypeError, match=r"aql_kernels\.fisher_ema_: fisher must be a list"):
                aql_kernels.fisher_ema_(fisher, grads, decay, scale=scale)
        else:
            expected = _expected(fisher, grads, float(decay), float(scale))
            aql_kernels.fisher_ema_(fisher, grads, decay, scale=scale)
            _assert_matches(fisher, expected)
        assert calls, "the Python route did not run"
    for fisher, grads, match in _overlaps("cpu"):
        calls.clear()
        before = [f.clone() for f in fisher]
        with pytest.raises(ValueError, match=match):
            aql_kernels.fisher_ema_(fisher, grads, 0.5)
        assert calls and all(torch.equal(f, b) for f, b in zip(fisher, before))
    state = torch.zeros(4)
    with pytest.raises(ValueError, match=r"the same fisher tensor appears twice"):
        aql_kernels.fisher_ema_([state, state], [torch.ones(4), torch.ones(4)], 0.5)
    for bad_decay, error in ((1.0, ValueError), (float("nan"), ValueError), (True, TypeError)):
        with pytest.raises(error, match=r"aql_kernels\.fisher_ema_: decay"):
            aql_kernels.fisher_ema_([torch.zeros(2)], [torch.ones(2)], bad_decay)
    with pytest.raises(TypeError, match=r"fisher\[0\] must be float32, got torch.float64"):
        aql_kernels.fisher_ema_([torch.zeros(2, dtype=torch.float64)], [torch.ones(2)], 0.5)
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape of fisher\[0\]"):
        aql_kernels.fisher_ema_([torch.zeros(2)], [torch.ones(3)], 0.5)
