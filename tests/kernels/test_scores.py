"""aql_kernels.scores: every implementation against a float64 reference, gradients against
F.cross_entropy, special values, torch.library integration and input validation."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import _dispatch, _native
from aql_kernels import scores as S
from aql_kernels.scores import IMPLEMENTATIONS, SoftmaxScores, cross_entropy_with_scores, softmax_scores
from tests.conftest import implementation_device

FLOAT_FIELDS = ("lse", "entropy", "maxprob", "margin", "loss", "el2n")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtype -> (atol, rtol) of the float32 statistics against the float64 reference evaluated on the
# same (already rounded) inputs: only the float32 accumulation differs, so the tolerances are those
# of float32 sums over up to 131073 terms, a little wider for the 16-bit inputs whose widely spaced
# values make near-ties in the top two more frequent.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-5, 3e-5),
    torch.float16: (3e-5, 3e-5),
}
# Every V and every N appears for every implementation; the grid is trimmed so that the Triton
# interpreter stays fast.
SHAPES = [(3, 1), (64, 2), (1, 7), (64, 1000), (3, 50257), (1, 131073)]
IGNORE = -100

# Under TRITON_INTERPRET=1 the Triton kernels run on NumPy, which warns on the NaN / inf rows that
# these tests build on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)


def _skip_unavailable(name: str) -> str:
    device = implementation_device(name)
    if name == "native" and not _native.CPU.has("aql_softmax_scores"):
        pytest.skip(f"the CPU library is unavailable ({_native.CPU.reason or 'no aql_softmax_scores'}); build it with `make native`")
    if name == "triton" and not _dispatch.triton_status().available:
        pytest.skip(_dispatch.triton_status().detail)
    return device


def _random_logits(n, v, dtype, device, *, row_stride=None):
    scale = torch.empty(n, 1).uniform_(0.5, 6.0)
    values = torch.randn(n, v) * scale + torch.randn(n, 1) * 3
    if row_stride is not None and row_stride > v:
        base = torch.randn(n, row_stride)
        base[:, :v] = values
        return base.to(dtype=dtype, device=device)[:, :v]
    return values.to(dtype=dtype, device=device)


def _random_targets(n, v, device, *, ignore_some=True):
    targets = torch.randint(0, v, (n,))
    if ignore_some and n > 1:
        targets[torch.rand(n) < 0.25] = IGNORE
    return targets.to(device)


def _poisoned_outputs(n, with_targets, device) -> SoftmaxScores:
    def nans():
        return torch.full((n,), float("nan"), device=device)

    return SoftmaxScores(nans(), nans(), nans(), nans(), torch.full((n,), -7, dtype=torch.int64, device=device),
                         nans() if with_targets else None, nans() if with_targets else None)


def _run(name, logits, targets, ignore_index=IGNORE, poison=True):
    """Calls implementation `name`, through its poisoned-output launcher where it has one."""
    if poison:
        out = _poisoned_outputs(logits.shape[0], targets is not None, logits.device)
        result = S._FORWARD[name](logits, targets, ignore_index, out=out)
        assert all(a is b for a, b in zip(result, out))
        return result
    return IMPLEMENTATIONS[name](logits, targets, ignore_index=ignore_index)


def _expected(logits, targets, ignore_index=IGNORE):
    return S.softmax_scores_reference(logits.cpu(), None if targets is None else targets.cpu(),
                                      ignore_index=ignore_index, accumulate_dtype=torch.float64)


def _assert_scores_close(got: SoftmaxScores, want: SoftmaxScores, atol, rtol, *, atol_rows=None):
    """Each float field within atol (+ atol_rows per row, for huge logits) + rtol * |want|, NaN
    where want is NaN, equal where want is infinite; argmax exact."""
    assert torch.equal(got.argmax.cpu(), want.argmax), f"argmax {got.argmax} != {want.argmax}"
    for field in FLOAT_FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        if w is None:
            assert g is None, field
            continue
        assert g.dtype == torch.float32 and g.shape == w.shape, (field, g.dtype, g.shape)
        g = g.cpu().double()
        bound = atol + rtol * w.abs()
        if atol_rows is not None:
            bound = bound + atol_rows
        nan_w, inf_w = torch.isnan(w), torch.isinf(w)
        ok = torch.where(nan_w, torch.isnan(g), torch.where(inf_w, g == w, (g - w).abs() <= bound))
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()[:5].tolist()
            raise AssertionError(f"{field}: rows {bad}: got {g[bad].tolist()}, want {w[bad].tolist()}")


# --------------------------------------------------------------------------------------------------
# forward against the float64 reference
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,v", SHAPES, ids=lambda x: str(x))
def test_matches_float64_reference(name, dtype, n, v):
    device = _skip_unavailable(name)
    logits = _random_logits(n, v, dtype, device)
    targets = _random_targets(n, v, device)
    atol, rtol = TOLERANCES[dtype]
    got = _run(name, logits, targets, poison=name != "reference")
    _assert_scores_close(got, _expected(logits, targets), atol, rtol)
    # without targets: same statistics, no loss / el2n
    got_plain = _run(name, logits, None, poison=name != "reference")
    assert got_plain.loss is None and got_plain.el2n is None
    _assert_scores_close(got_plain, _expected(logits, None), atol, rtol)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("v", [7, 5000])
def test_non_contiguous_rows_and_int32_targets(name, v):
    device = _skip_unavailable(name)
    logits = _random_logits(5, v, torch.float32, device, row_stride=v + 37)
    assert logits.stride(0) == v + 37 and not logits.is_contiguous()
    targets = _random_targets(5, v, device).to(torch.int32)
    got = _run(name, logits, targets)
    _assert_scores_close(got, _expected(logits, targets.long()), *TOLERANCES[torch.float32])
    # a transposed view (column stride != 1) is accepted too
    transposed = _random_logits(v, 4, torch.float32, device).t()
    got_t = _run(name, transposed, None)
    _assert_scores_close(got_t, _expected(transposed, None), *TOLERANCES[torch.float32])
    # so is an expanded one (row stride 0)
    expanded = _random_logits(1, v, torch.float32, device).expand(3, v)
    got_e = _run(name, expanded, None)
    _assert_scores_close(got_e, _expected(expanded, None), *TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_largest_vocabulary(name):
    # V = 262144 (the top of the supported range): 128 steps of the Triton column loop.
    device = _skip_unavailable(name)
    logits = _random_logits(2, 262144, torch.bfloat16, device)
    targets = _random_targets(2, 262144, device, ignore_some=False)
    got = _run(name, logits, targets, poison=name != "reference")
    _assert_scores_close(got, _expected(logits, targets), *TOLERANCES[torch.bfloat16])


def _adversarial(v, dtype, device):
    """Rows that break naive kernels; V > 4096 so that several chunks / blocks are involved."""
    x = torch.randn(13, v)
    targets = torch.randint(0, v, (13,))
    x[1, torch.randperm(v)[: v // 3]] = float("-inf")                # -inf entries
    targets[1] = int(torch.nonzero(x[1] > float("-inf"))[0, 0])
    x[2] = torch.sign(torch.randn(v)) * 1e4 + torch.randn(v)         # logits of +-1e4
    x[3] = 2.5                                                        # all equal: argmax 0, margin 0
    j1, j2 = sorted(torch.randperm(v)[:2].tolist())
    x[4, j1] = x[4, j2] = 50.0                                        # tie for the max (mostly 2 chunks)
    x[5, torch.randint(0, v, (1,))] = float("nan")                    # NaN row
    targets[6] = IGNORE                                               # ignored row
    x[7] = float("-inf")                                              # only -inf
    x[8, torch.randint(0, v, (1,))] = float("inf")                    # +inf row
    x[9, 17] = float("-inf")                                          # target on a -inf logit
    targets[9] = 17
    x[10] = torch.linspace(-30, 30, v)                                # maximum grows chunk after chunk
    x[11, : v // 2] = float("-inf")                                   # first chunk(s) only -inf
    targets[11] = v - 1
    x[12, : v // 2] = -3e38                                           # the shift jumps across the
    x[12, v // 2 :] = 3e38                                            # whole float range
    targets[12] = v - 1
    return x.to(dtype=dtype, device=device), targets.to(device)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_adversarial_rows(name, dtype):
    device = _skip_unavailable(name)
    v = 9000
    logits, targets = _adversarial(v, dtype, device)
    got = _run(name, logits, targets, poison=name != "reference")
    want = _expected(logits, targets)
    # rows of huge logits: float32 carries ~4e-7 * |logit| absolute error on lse and loss there
    # (~4e-3 for +-1e4; row 12 at 3e38 is checked by the spot checks below instead)
    huge = logits.float().cpu().nan_to_num(0, 0, 0).abs().amax(dim=1).double()
    atol, rtol = TOLERANCES[dtype]
    _assert_scores_close(got, want, atol, rtol, atol_rows=4e-7 * huge)
    # spot checks of the documented special values, independent of the reference
    assert got.argmax[3] == 0 and got.margin[3] == 0
    assert math.isclose(float(got.entropy[3]), math.log(v), rel_tol=1e-5)
    assert got.argmax[4] == _first_max_index(logits[4]) and got.margin[4] == 0
    assert torch.isnan(got.lse[5]) and got.argmax[5] == int(torch.isnan(logits[5].float()).nonzero()[0, 0])
    assert got.loss[6] == 0 and got.el2n[6] == 0
    assert got.lse[7] == float("-inf") and torch.isnan(got.entropy[7])
    assert got.lse[8] == float("inf") and torch.isnan(got.maxprob[8])
    assert got.loss[9] == float("inf")
    assert got.argmax[10] == _first_max_index(logits[10]) >= v - 20  # (bfloat16 rounds the top values into ties)
    assert got.argmax[12] == v // 2 and got.margin[12] == 0
    assert math.isclose(float(got.entropy[12]), math.log(v - v // 2), rel_tol=1e-5)
    assert math.isclose(float(got.maxprob[12]), 1 / (v - v // 2), rel_tol=1e-5)
    for field in ("lse", "entropy", "maxprob", "margin", "loss", "el2n"):
        finite_rows = [0, 1, 2, 3, 4, 10, 11, 12]
        assert torch.isfinite(getattr(got, field)[finite_rows]).all(), field


def _first_max_index(row: torch.Tensor) -> int:
    return int((row == row.max()).nonzero()[0, 0])


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_confident_rows_keep_el2n_accurate(name):
    # p_target ~ 1: sum p^2 - 2 p_t + 1 cancels in float32 (~3e-4 after the square root); the
    # kernels accumulate the two non-negative parts separately.
    device = _skip_unavailable(name)
    v = 1000
    logits = torch.randn(8, v) * 0.1
    targets = torch.randint(0, v, (8,))
    logits[torch.arange(8), targets] = torch.linspace(12, 20, 8)
    logits, targets = logits.to(device), targets.to(device)
    got = _run(name, logits, targets)
    want = _expected(logits, targets)
    assert (want.el2n < 1e-2).all()
    torch.testing.assert_close(got.el2n.cpu().double(), want.el2n, atol=2e-7, rtol=1e-4)


@pytest.mark.parametrize("name", ["native", "reference"])
def test_target_out_of_range_raises_on_cpu(name):
    _skip_unavailable(name)
    logits = torch.randn(4, 10)
    for bad in (10, -1, 1 << 40):
        targets = torch.tensor([0, 3, bad, 2])
        with pytest.raises(ValueError, match=rf"target {bad} of row 2 is outside \[0, 10\)"):
            IMPLEMENTATIONS[name](logits, targets)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        softmax_scores(logits, torch.tensor([0, 3, 10, 2]))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        S._BACKWARD[name](logits, torch.tensor([0, 3, 10, 2]), torch.zeros(4), torch.ones(4), IGNORE, torch.empty(4, 10))


def test_triton_target_out_of_range_gives_nan_loss():
    device = _skip_unavailable("triton")
    logits = _random_logits(4, 10, torch.float32, device)
    targets = torch.tensor([0, 3, 10, -5], device=device)
    got = _run("triton", logits, targets)
    assert torch.isnan(got.loss[2:]).all() and torch.isnan(got.el2n[2:]).all()
    assert torch.isfinite(got.loss[:2]).all()
    want = _expected(logits, None)
    _assert_scores_close(got._replace(loss=None, el2n=None), want, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("route", ["eager", "registered ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_public_functions_match_float64_reference(monkeypatch, route, dtype):
    # The public functions on odd shapes, through whatever they dispatch to on each route, against the
    # float64 reference (not against the implementation they call: that would pass with a broken kernel).
    if route == "registered ops":
        monkeypatch.setattr(S._dispatch, "eager", lambda *tensors: False)
    atol, rtol = TOLERANCES[dtype]
    for n, v in [(6, 300), (1, 1), (37, 5001)]:
        logits = _random_logits(n, v, dtype, "cpu")
        targets = _random_targets(n, v, "cpu")
        _assert_scores_close(softmax_scores(logits, targets), _expected(logits, targets), atol, rtol)
        _assert_scores_close(softmax_scores(logits), _expected(logits, None), atol, rtol)
        loss, scores = cross_entropy_with_scores(logits, targets, reduction="sum")
        _assert_scores_close(scores, _expected(logits, targets), atol, rtol)
        want = F.cross_entropy(logits.double(), targets, ignore_index=IGNORE, reduction="sum")
        torch.testing.assert_close(loss.double(), want, atol=atol * n, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# the Triton forward split over several programs per row
# --------------------------------------------------------------------------------------------------

def _split_rows(v, block, dtype, device):
    """Rows whose decisive columns sit at block and chunk boundaries (block * chunk_blocks)."""
    x = (torch.randn(12, v) * 2).clamp(-6.0, 6.0)  # below the planted maxima
    targets = torch.randint(0, v, (12,))
    x[0, block - 1] = x[0, block] = 9.0                   # tie across a block boundary: argmax block - 1
    x[1, v - 1] = 9.0                                      # maximum in the last (partial) block
    x[1, 0] = 8.0                                          # second largest in the first
    targets[1] = v - 1
    x[2, 3] = x[2, 3 + block] = 7.0                        # same lane, two blocks: the earlier one wins
    x[3, :] = 1.25                                         # all equal over every chunk
    x[4, : 2 * block] = float("-inf")                      # leading chunk(s) of -inf
    targets[4] = 2 * block
    x[5, v - 2] = float("nan")                             # NaN in the last chunk only ...
    x[6, 2 * block + 1] = x[6, v - 1] = float("nan")       # ... and in two chunks: the first one counts
    x[7, block + 2] = float("inf")                         # +inf in a middle chunk
    x[8, block:] = 30.0 + torch.randn(v - block)           # the maximum grows from chunk to chunk
    x[8, v - 1] = 40.0
    x[9, 5] = 11.0                                          # the target is the maximum, far ahead
    targets[9] = 5
    targets[10] = IGNORE
    targets[11] = 3
    return x.to(dtype=dtype, device=device), targets.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("block,chunk_blocks,v", [(16, 1, 100), (32, 2, 203), (64, 3, 1000), (16, 4, 64)],
                         ids=lambda x: str(x))
def test_triton_split_rows_match_reference(dtype, block, chunk_blocks, v):
    # small blocks make many chunks per row (up to 13 here); V is not a multiple of the chunk, except
    # in the last case (V = one chunk exactly, the kernel then finishes the row without partials)
    device = _skip_unavailable("triton")
    logits, targets = _split_rows(v, block, dtype, device)
    out = _poisoned_outputs(logits.shape[0], True, device)
    got = S._triton_forward(logits, targets, IGNORE, out=out, block=block, chunk_blocks=chunk_blocks)
    _assert_scores_close(got, _expected(logits, targets), *TOLERANCES[dtype])
    assert got.argmax[0] == block - 1 and got.margin[0] == 0
    assert got.argmax[2] == 3 and got.margin[2] == 0
    assert got.argmax[3] == 0 and got.margin[3] == 0
    assert got.argmax[5] == v - 2 and got.argmax[6] == 2 * block + 1
    # without targets, and with an ignore_index that is a real column (its row keeps its statistics)
    plain = S._triton_forward(logits, None, IGNORE, block=block, chunk_blocks=chunk_blocks)
    _assert_scores_close(plain, _expected(logits, None), *TOLERANCES[dtype])
    targets = torch.where(targets == IGNORE, 0, targets)
    column = S._triton_forward(logits, targets, 3, block=block, chunk_blocks=chunk_blocks)
    _assert_scores_close(column, _expected(logits, targets, ignore_index=3), *TOLERANCES[dtype])
    assert column.loss[11] == 0 and column.el2n[11] == 0


def test_triton_forward_grid():
    # the chunk count that the launcher picks: enough programs per SM, bounded steps per program
    if S.triton is None:
        pytest.skip("triton is not installed")
    block = S._BLOCK
    assert S._forward_grid(4096, 32000, 132, block, None) == (8, 2)        # 16 blocks a row, 8192 programs
    assert S._forward_grid(8192, 128256, 132, block, None) == (8, 8)
    assert S._forward_grid(1, 262144, 132, block, None) == (1, 128)        # one row: one block per program
    assert S._forward_grid(64, 100, 132, block, None) == (1, 1)
    for n, v in [(1, 1), (3, 50257), (7, 2049), (100000, 4096 * 3 + 1), (1, 2**30)]:
        chunk_blocks, n_chunks = S._forward_grid(n, v, 132, block, None)
        blocks = -(-v // block)
        assert 1 <= chunk_blocks and n_chunks * chunk_blocks >= blocks and n_chunks <= S._CHUNKS_MAX
        assert chunk_blocks <= S._CHUNK_BLOCKS_MAX or v > S._CHUNKS_MAX * S._CHUNK_BLOCKS_MAX * block
        assert (n_chunks - 1) * chunk_blocks < blocks  # no empty chunk


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_cross_entropy_matches_torch(reduction, inplace_backward):
    n, v = 37, 1003
    base = _random_logits(n, v, torch.float32, "cpu").requires_grad_(True)
    targets = _random_targets(n, v, "cpu")
    logits = base * 1.0  # a non-leaf, as the output of a model head would be
    loss, scores = cross_entropy_with_scores(logits, targets, ignore_index=IGNORE, reduction=reduction,
                                             inplace_backward=inplace_backward)
    reference_input = base.detach().double().requires_grad_(True)
    want = F.cross_entropy(reference_input, targets, ignore_index=IGNORE, reduction=reduction)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=2e-5)
    assert loss.dtype == torch.float32
    assert all(not t.requires_grad for t in scores if t is not None)
    _assert_scores_close(scores, _expected(base.detach(), targets), *TOLERANCES[torch.float32])
    weights = torch.rand_like(want) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (loss * weights.float()).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(base.grad.double(), reference_input.grad, atol=1e-7, rtol=1e-5)
    if inplace_backward:  # the gradient was written over the logits' buffer
        torch.testing.assert_close(logits.detach(), base.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_eager_path_matches_the_registered_ops(monkeypatch, reduction):
    # The public functions skip the torch.library dispatch in eager mode; both routes must agree.
    n, v = 11, 300
    base = _random_logits(n, v, torch.float32, "cpu")
    targets = _random_targets(n, v, "cpu")

    def run():
        x = base.clone().requires_grad_(True)
        loss, scores = cross_entropy_with_scores(x, targets, reduction=reduction)
        weights = torch.linspace(0.5, 2.0, n) if reduction == "none" else torch.tensor(1.3)
        (loss * weights).sum().backward()
        return loss.detach(), scores, x.grad, softmax_scores(base, targets)

    eager = run()
    monkeypatch.setattr(S._dispatch, "eager", lambda *tensors: False)
    through_ops = run()
    for a, b in zip(eager[:3], through_ops[:3]):
        if isinstance(a, tuple):
            for u, w in zip(a, b):
                assert torch.equal(u, w)
        else:
            assert torch.equal(a, b)
    for u, w in zip(eager[3], through_ops[3]):
        assert torch.equal(u, w)
    assert eager[1].loss.requires_grad is False and eager[1].loss.shape == (n,)


def test_tracing_modes_use_the_registered_ops():
    # Under FakeTensorMode (what export / AOT tracing run) the eager shortcut must not touch data.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(6, 40)
        targets = torch.zeros(6, dtype=torch.int64)
        scores = softmax_scores(logits, targets)
        loss, _ = cross_entropy_with_scores(logits.requires_grad_(True), targets)
    assert scores.lse.shape == (6,) and scores.argmax.dtype == torch.int64 and loss.shape == ()


def test_inplace_backward_bumps_the_version_counter():
    # x is saved by the multiplication before the loss overwrites it with its gradient: using the
    # saved x afterwards must raise, not silently read the gradient.
    base = _random_logits(4, 50, torch.float32, "cpu").requires_grad_(True)
    x = base * 1.0
    squares = (x * x).sum()
    loss, _ = cross_entropy_with_scores(x, _random_targets(4, 50, "cpu", ignore_some=False), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares).backward()


def test_cross_entropy_without_grad_returns_plain_tensors():
    logits = _random_logits(5, 40, torch.float32, "cpu").requires_grad_(True)
    targets = _random_targets(5, 40, "cpu")
    with torch.no_grad():
        loss, scores = cross_entropy_with_scores(logits, targets)
    assert not loss.requires_grad and all(not t.requires_grad for t in scores)
    want = F.cross_entropy(logits.detach().double(), targets, ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=2e-5)


def test_cross_entropy_all_rows_ignored_is_nan_like_torch():
    logits = torch.randn(3, 5, requires_grad=True)
    targets = torch.full((3,), IGNORE)
    loss, _ = cross_entropy_with_scores(logits, targets)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets))
    loss_sum, _ = cross_entropy_with_scores(logits, targets, reduction="sum")
    loss_sum.backward()
    assert loss_sum == 0 and (logits.grad == 0).all()


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_kernels_match_autograd(name, dtype, inplace):
    device = _skip_unavailable(name)
    n, v = 9, 5000
    logits = _random_logits(n, v, dtype, device)
    targets = _random_targets(n, v, device)
    grad_rows = torch.randn(n, device=device)
    lse = S.softmax_scores_reference(logits, targets).lse
    x64 = logits.detach().cpu().double().requires_grad_(True)
    rows = F.cross_entropy(x64, targets.cpu(), ignore_index=IGNORE, reduction="none")
    (rows * grad_rows.cpu().double()).sum().backward()
    if inplace:
        out = logits.clone()
        result = S._BACKWARD[name](out, targets, lse, grad_rows, IGNORE, out)
    else:
        out = torch.full_like(logits, float("nan"))  # poison
        result = S._BACKWARD[name](logits, targets, lse, grad_rows, IGNORE, out)
    assert result is out and out.dtype == dtype
    atol, rtol = {torch.float32: (1e-7, 1e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-5, 2e-3)}[dtype]
    torch.testing.assert_close(out.cpu().double(), x64.grad, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------------------

def test_opcheck():
    logits = _random_logits(5, 33, torch.float32, "cpu")
    targets = _random_targets(5, 33, "cpu")
    torch.library.opcheck(torch.ops.aql.softmax_scores.default, (logits, targets, IGNORE))
    torch.library.opcheck(torch.ops.aql.softmax_scores.default, (logits, None, IGNORE))
    lse = S.softmax_scores_reference(logits, targets).lse
    torch.library.opcheck(torch.ops.aql.softmax_scores_backward.default, (logits, targets, lse, torch.randn(5), IGNORE))
    torch.library.opcheck(torch.ops.aql.softmax_scores_backward_.default, (logits.clone(), targets, lse, torch.randn(5), IGNORE))


def test_torch_compile_fullgraph():
    logits = _random_logits(6, 100, torch.float32, "cpu").requires_grad_(True)
    targets = _random_targets(6, 100, "cpu")

    def step(x, t):
        scores = softmax_scores(x.detach(), t)
        loss, _ = cross_entropy_with_scores(x, t)
        return loss, scores.entropy, scores.argmax

    # aot_eager: Dynamo and AOTAutograd trace the ops through their fake implementations and the
    # registered autograd (what this checks) without Inductor's C++ code generation, which would
    # take most of this file's time budget on a 2-core machine and adds nothing for opaque ops.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, entropy, argmax = compiled(logits, targets)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    eager_loss, eager_entropy, eager_argmax = step(logits, targets)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(entropy, eager_entropy)
    assert torch.equal(argmax, eager_argmax)
    torch.testing.assert_close(grad, logits.grad)


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------

def _public_and_implementations():
    return [("public", softmax_scores)] + [(name, fn) for name, fn in sorted(IMPLEMENTATIONS.items())]


@pytest.mark.parametrize("label,fn", _public_and_implementations(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise(label, fn):
    good = torch.randn(4, 6)
    op = "softmax_scores_reference" if label == "reference" else "softmax_scores"
    # the public function also takes 3-D sequences (tests/kernels/test_scores_sequences.py)
    too_many = torch.randn(2, 3, 4, 5) if label == "public" else torch.randn(2, 3, 4)
    cases = [
        ((torch.randn(6),), ValueError, rf"aql_kernels.{op}: logits must be 2-D.*, got shape \(6,\)"),
        ((too_many,), ValueError, r"logits must be 2-D.*, got shape " + re.escape(str(tuple(too_many.shape)))),
        ((torch.ones(4, 6, dtype=torch.int64),), TypeError, r"logits must have dtype in \(float32, bfloat16, float16\), got torch.int64"),
        (([[1.0, 2.0]],), TypeError, r"logits must be a torch.Tensor, got list"),
        ((torch.randn(4, 0),), ValueError, r"V >= 1 columns, got shape \(4, 0\)"),
        ((good, torch.zeros(3, dtype=torch.int64)), ValueError, r"targets must have length N=4, got 3"),
        ((good, torch.zeros(4)), TypeError, r"targets must have dtype in \(int64, int32\), got torch.float32"),
        ((good, torch.zeros(4, 1, dtype=torch.int64)), ValueError, r"targets must be 1-D"),
        ((good, torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, r"targets must be on cpu"),
    ]
    for args, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fn(*args)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got float"):
        fn(good, None, ignore_index=-100.0)
    # no rows is an empty batch, not an error (as for F.cross_entropy)
    empty = fn(torch.randn(0, 6), torch.zeros(0, dtype=torch.int64))
    assert all(x.shape == (0,) for x in empty) and empty.argmax.dtype == torch.int64


@pytest.mark.parametrize("name", ["public", *sorted(IMPLEMENTATIONS)])
def test_ignore_index_outside_int64_is_refused(name):
    # it crosses the C ABI and the Triton launcher as an int64: a wider Python int would wrap around
    fn = softmax_scores if name == "public" else IMPLEMENTATIONS[name]
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    for bad in (2**63, -(2**63) - 1, 2**64 - 100):
        with pytest.raises(ValueError, match=rf"ignore_index must be in \[-9223372036854775808, 9223372036854775807\], got {bad}"):
            fn(logits, targets, ignore_index=bad)
    with pytest.raises(ValueError, match=r"cross_entropy_with_scores: ignore_index must be in"):
        cross_entropy_with_scores(logits, targets, ignore_index=2**63)
    # the extremes themselves are fine (and ignore nothing here)
    for edge in (2**63 - 1, -(2**63)):
        got = fn(logits, targets, ignore_index=edge)
        _assert_scores_close(got, _expected(logits, targets, ignore_index=edge), *TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", ["expanded", "overlapping rows", "leaf"])
def test_inplace_backward_refuses_logits_it_would_corrupt(case):
    # Writing the gradient over rows that share memory mixes them (the Triton path gave wrong
    # gradients, the native one failed only in backward); over a leaf it would make .grad the
    # parameter's own buffer. Refused at the call, before any work.
    targets = torch.tensor([1, 2, 3, 0])
    base = torch.randn(1, 10, requires_grad=True)
    logits = {
        "expanded": lambda: (base * 1.0).expand(4, 10),
        "overlapping rows": lambda: (base.repeat(1, 4) * 1.0).flatten().as_strided((4, 10), (5, 1)),  # row stride 5
        "leaf": lambda: torch.randn(4, 10, requires_grad=True),
    }[case]()
    if case == "leaf":
        match = r"inplace_backward cannot write the gradient over a leaf"
    else:
        match = r"inplace_backward needs logits whose rows do not overlap \(row stride >= V=10\)"
    with pytest.raises(ValueError, match=rf"aql_kernels.cross_entropy_with_scores: {match}"):
        cross_entropy_with_scores(logits, targets, inplace_backward=True)
    # out of place, the same logits give torch's gradient
    loss, _ = cross_entropy_with_scores(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach().double().requires_grad_(True)
    F.cross_entropy(x64, targets).backward()
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-7, rtol=1e-5)


def test_inplace_backward_accepts_a_leaf_without_grad_or_under_no_grad():
    leaf = _random_logits(3, 20, torch.float32, "cpu").requires_grad_(True)
    targets = torch.tensor([0, 5, 19])
    with torch.no_grad():  # nothing will be written: no reason to refuse
        loss, _ = cross_entropy_with_scores(leaf, targets, inplace_backward=True)
    plain = leaf.detach().clone()
    loss_plain, _ = cross_entropy_with_scores(plain, targets, inplace_backward=True)
    torch.testing.assert_close(loss, loss_plain)


def test_cross_entropy_bad_inputs_raise():
    good, targets = torch.randn(4, 6), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"cross_entropy_with_scores: reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        cross_entropy_with_scores(good, targets, reduction="avg")
    with pytest.raises(TypeError, match=r"cross_entropy_with_scores: targets must be a torch.Tensor of class indices, got None"):
        cross_entropy_with_scores(good, None)
    with pytest.raises(TypeError, match=r"inplace_backward must be a bool, got int"):
        cross_entropy_with_scores(good, targets, inplace_backward=1)
    with pytest.raises(ValueError, match=r"inplace_backward needs logits with unit column stride"):
        cross_entropy_with_scores(torch.randn(6, 4).t(), targets, inplace_backward=True)
    with pytest.raises(ValueError, match=r"cross_entropy_with_scores: logits must be 2-D \[N, V\] or 3-D \[B, T, V\]"):
        cross_entropy_with_scores(torch.randn(2, 3, 4, 5), targets)
    with pytest.raises(ValueError, match=r"cross_entropy_with_scores: targets must be 2-D"):
        cross_entropy_with_scores(torch.randn(2, 3, 4), targets)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        cross_entropy_with_scores(good, torch.tensor([0, 1, 6, 2]))


@pytest.mark.skipif(not _native.CPU.has("aql_softmax_scores"), reason="the CPU library is not built")
def test_native_status_codes():
    # The C entry points check their own arguments too (a NULL output, a short row stride).
    p = _native.pointer
    logits = torch.randn(2, 8)
    outs = [torch.empty(2) for _ in range(4)] + [torch.empty(2, dtype=torch.int64)]
    with pytest.raises(_native.NativeError, match=r"row_stride must be >= v=8, got 4"):
        _native.CPU.call("aql_softmax_scores", p(logits), 0, 2, 8, 4, p(None), IGNORE, *[p(o) for o in outs], p(None), p(None))
    with pytest.raises(_native.NativeError, match=r"unknown dtype code 9"):
        _native.CPU.call("aql_softmax_scores", p(logits), 9, 2, 8, 8, p(None), IGNORE, *[p(o) for o in outs], p(None), p(None))
    with pytest.raises(_native.NativeError, match=r"loss and el2n must not be NULL"):
        _native.CPU.call("aql_softmax_scores", p(logits), 0, 2, 8, 8, p(torch.zeros(2, dtype=torch.int64)), IGNORE,
                         *[p(o) for o in outs], p(None), p(None))
