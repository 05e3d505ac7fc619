"""aql_kernels.scores' C++ kernels on short rows (V = 1..17, 31..33): the one-vector forward of rows of
at most 16 columns, the masked tail of the backward and the serial (no OpenMP team) small calls,
in every CPU variant, against the float64 reference and F.cross_entropy's float64 gradient, on
special values (NaN, +-inf, ties, -0.0, huge logits, ignored rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import scores as S
from aql_kernels._native import CpuIsa
from tests.kernels.test_scores import IGNORE, TOLERANCES, _assert_scores_close, _expected, _poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

WIDTHS = [*range(1, 18), 31, 32, 33]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _short_adversarial(v: int, dtype: torch.dtype, generator: torch.Generator):
    """Random rows plus one row per special case that fits in v columns; (logits, targets)."""
    n_random = 40
    x = torch.randn(n_random + 12, v, generator=generator) * 4
    t = torch.randint(0, v, (x.shape[0],), generator=generator)
    t[torch.rand(x.shape[0], generator=generator) < 0.2] = IGNORE
    r = n_random
    pick = lambda: int(torch.randint(0, v, (1,), generator=generator))  # noqa: E731
    x[r + 0] = 2.5                                                 # all equal: argmax 0, margin 0
    x[r + 1, pick()] = float("nan")                                # NaN row
    x[r + 2] = float("-inf")                                       # only -inf
    x[r + 3, pick()] = float("inf")                                # +inf row
    j = pick()
    x[r + 4, j] = float("-inf")                                    # target on a -inf logit
    t[r + 4] = j
    x[r + 5] = torch.sign(torch.randn(v, generator=generator)) * 1e4  # +-1e4: ties and a huge shift
    x[r + 6] = 0.0
    x[r + 6, ::2] = -0.0                                           # 0.0 and -0.0 tie for the max
    x[r + 7, v // 2:] = 3e38                                       # the float range
    x[r + 7, :v // 2] = -3e38
    t[r + 7] = v - 1                                               # (a loss of 6e38 is no float32)
    t[r + 8] = IGNORE                                              # ignored row
    if v >= 2:
        a, b = sorted(torch.randperm(v, generator=generator)[:2].tolist())
        x[r + 9, a] = x[r + 9, b] = 40.0                           # tie for the max
        x[r + 10, : v - 1] = float("-inf")                         # one finite logit, last column
        t[r + 10] = v - 1
    x[r + 11, -1] = float("nan")                                   # NaN in the last column
    if v == 1:
        # a lone -inf column: the kernels give the documented NaN el2n, the reference 0 (its
        # scatter removes the one NaN probability); not what these tests are about
        t[r + 2] = t[r + 4] = IGNORE
    return x.to(dtype), t


@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_short_rows_forward_match_float64_reference(cpu_variant, dtype):
    generator = torch.Generator().manual_seed(1000 + int(cpu_variant))
    for v in WIDTHS:
        logits, targets = _short_adversarial(v, dtype, generator)
        for tg in (targets, None):
            out = _poisoned_outputs(logits.shape[0], tg is not None, "cpu")
            got = S._FORWARD["native"](logits, tg, IGNORE, out=out)
            want = _expected(logits, tg)
            huge = logits.float().nan_to_num(0, 0, 0).abs().amax(dim=1).double()
            try:
                _assert_scores_close(got, want, *TOLERANCES[dtype], atol_rows=4e-7 * huge)
            except AssertionError as error:
                raise AssertionError(f"V={v}, targets={tg is not None}: {error}") from None
        # spot checks independent of the reference (row 40: all equal; 42: only -inf; 43: +inf)
        assert got.argmax[40] == 0 and got.margin[40] == (0.0 if v >= 2 else 1.0)
        assert got.lse[42] == float("-inf") and got.lse[43] == float("inf")


@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_short_rows_backward_match_autograd(cpu_variant, dtype):
    generator = torch.Generator().manual_seed(2000 + int(cpu_variant))
    # with few columns p_target nears 1, and g (p_t - 1) carries the rounding of the float32 lse
    # (|lse| ~ 10: ~1e-6) as an absolute error
    atol, rtol = {torch.float32: (4e-6, 1e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-5, 2e-3)}[dtype]
    for v in WIDTHS:
        n = 37
        logits = (torch.randn(n, v, generator=generator) * 3).to(dtype)
        targets = torch.randint(0, v, (n,), generator=generator)
        targets[::5] = IGNORE
        grad_rows = torch.randn(n, generator=generator)
        lse = S.softmax_scores_reference(logits, targets).lse
        x64 = logits.double().requires_grad_(True)
        (F.cross_entropy(x64, targets, ignore_index=IGNORE, reduction="none") * grad_rows.double()).sum().backward()
        # a row stride wider than V: the masked tail must not write past the row
        base = torch.full((n, v + 3), float("nan"), dtype=dtype)
        out = base[:, :v]
        S._BACKWARD["native"](logits, targets, lse, grad_rows, IGNORE, out)
        torch.testing.assert_close(out.double(), x64.grad, atol=atol, rtol=rtol, msg=lambda m: f"V={v}: {m}")
        assert torch.isnan(base[:, v:]).all(), f"V={v}: the backward wrote outside its rows"
        inplace = logits.clone()
        S._BACKWARD["native"](inplace, targets, lse, grad_rows, IGNORE, inplace)
        torch.testing.assert_close(inplace.double(), x64.grad, atol=atol, rtol=rtol, msg=lambda m: f"V={v} in place: {m}")


@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
def test_short_rows_nan_and_inf_gradients(cpu_variant):
    # NaN logits give NaN gradients in their row (not zeros, not the scalar path's clamp); ignored
    # rows give zeros whatever their logits and lse
    v = 10
    logits = torch.randn(4, v)
    logits[0, 3] = float("nan")
    logits[2, 5] = float("nan")
    targets = torch.tensor([1, 2, IGNORE, 4])
    lse = S.softmax_scores_reference(logits, targets).lse
    out = torch.empty_like(logits)
    S._BACKWARD["native"](logits, targets, lse, torch.ones(4), IGNORE, out)
    assert torch.isnan(out[0]).all()
    assert (out[2] == 0).all()
    assert torch.isfinite(out[[1, 3]]).all()
