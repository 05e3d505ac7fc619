"""aql_kernels.scores on sequences: [B, T, V] logits with [B, T] targets, the causal shift, padding,
per-sequence scores, and F.cross_entropy's label_smoothing and class weight, against float64
references (F.cross_entropy on the flattened, shifted tokens for the loss and its gradient; the
float64 spec with an explicit loop over sequences for the scores)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import scores as S
from aql_kernels.scores import SoftmaxScores, cross_entropy_with_scores, softmax_scores

IGNORE = -100
FLOAT_FIELDS = ("lse", "entropy", "maxprob", "margin", "loss", "el2n")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# dtype -> (atol, rtol) of the gradient, rounded to the logits' dtype (label smoothing adds one more
# rounding of a correction term in that dtype)
GRAD_TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-3, 1.6e-2), torch.float16: (2e-4, 2e-3)}
# the float32 loss and statistics against float64 on the same (rounded) inputs
SCORE_TOLERANCES = (3e-5, 3e-5)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)


def _tokens(b, t, v, dtype, *, ignore_fraction=0.25):
    logits = (torch.randn(b, t, v) * torch.empty(b, t, 1).uniform_(0.5, 4.0) + torch.randn(b, t, 1)).to(dtype)
    targets = torch.randint(0, v, (b, t))
    targets[torch.rand(b, t) < ignore_fraction] = IGNORE
    return logits, targets


def _shifted(x, targets, shift):
    """What the caller means: the positions scored and their targets (float64 copies, no kernels)."""
    if shift:
        return x[:, :-1], None if targets is None else targets[:, 1:]
    return x, targets


def _reference_loss_and_grad(logits, targets, shift, reduction, upstream, **options):
    x64 = logits.detach().double().requires_grad_(True)
    xs, ts = _shifted(x64, targets, shift)
    weight = options.get("weight")
    options = dict(options, weight=None if weight is None else weight.double())
    want = F.cross_entropy(xs.reshape(-1, xs.shape[-1]), ts.reshape(-1), ignore_index=IGNORE, reduction=reduction, **options)
    (want * upstream).sum().backward()
    return want, x64.grad


def _reference_per_sample(logits, targets, shift, per_sample):
    """Per-sequence statistics from the float64 spec, one sequence at a time."""
    xs, ts = _shifted(logits.detach(), targets, shift)
    per_token = [S.softmax_scores_reference(xs[i], None if ts is None else ts[i], ignore_index=IGNORE,
                                            accumulate_dtype=torch.float64) for i in range(xs.shape[0])]
    if per_sample == "none":
        return per_token
    out = {}
    for name in FLOAT_FIELDS:
        if targets is None and name in ("loss", "el2n"):
            out[name] = None
            continue
        values = []
        for i, scores in enumerate(per_token):
            keep = torch.ones(xs.shape[1], dtype=torch.bool) if ts is None else ts[i] != IGNORE
            total = float(getattr(scores, name)[keep].sum())
            count = int(keep.sum())
            values.append(total if per_sample == "sum" else (total / count if count else math.nan))
        out[name] = torch.tensor(values, dtype=torch.float64)
    return out


def _assert_close(got, want, atol, rtol, what):
    got = got.detach().cpu().double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_per_sample(got: SoftmaxScores, want, per_sample, b, positions):
    if per_sample == "none":
        for name in FLOAT_FIELDS:
            if getattr(want[0], name) is None:
                assert getattr(got, name) is None, name
                continue
            stacked = torch.stack([getattr(w, name) for w in want]) if want else torch.empty(b, positions, dtype=torch.float64)
            _assert_close(getattr(got, name), stacked, *SCORE_TOLERANCES, name)
        argmax = torch.stack([w.argmax for w in want]) if want else torch.empty(b, positions, dtype=torch.int64)
        assert torch.equal(got.argmax, argmax)
        return
    assert got.argmax is None
    for name in FLOAT_FIELDS:
        if want[name] is None:
            assert getattr(got, name) is None, name
        else:
            _assert_close(getattr(got, name), want[name], *SCORE_TOLERANCES, name)


# --------------------------------------------------------------------------------------------------
# loss and gradient against F.cross_entropy in float64
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,weighted", [(0.0, False), (0.0, True), (0.15, False), (0.3, True)],
                         ids=["plain", "weight", "smoothing", "weight+smoothing"])
def test_loss_and_gradient_match_float64_cross_entropy(dtype, shift, reduction, label_smoothing, weighted):
    b, t, v = 3, 9, 37
    logits, targets = _tokens(b, t, v, dtype)
    weight = torch.rand(v) * 2 if weighted else None
    base = logits.clone().requires_grad_(True)
    x = base * 1.0  # a non-leaf of the logits' dtype, as a model head's output
    loss, scores = cross_entropy_with_scores(x, targets, reduction=reduction, label_smoothing=label_smoothing,
                                             weight=weight, shift=shift)
    positions = t - 1 if shift else t
    upstream = torch.rand(b * positions, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    want, want_grad = _reference_loss_and_grad(logits, targets, shift, reduction, upstream,
                                               label_smoothing=label_smoothing, weight=weight)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    _assert_close(loss, want, 3e-5 * (b * t if reduction == "sum" else 1), 3e-5, "loss")
    (loss * upstream.float()).sum().backward()
    assert base.grad.dtype == dtype and base.grad.shape == (b, t, v)
    _assert_close(base.grad, want_grad, *GRAD_TOLERANCES[dtype], "gradient")
    if shift:  # the last position scores nothing: its gradient is exactly zero
        assert (base.grad[:, -1] == 0).all()
    # the scores: per sequence, the unweighted unsmoothed NLL among them, detached
    assert all(not x.requires_grad for x in scores if x is not None)
    _assert_per_sample(scores, _reference_per_sample(logits.float(), targets, shift, "mean"), "mean", b, positions)


@pytest.mark.parametrize("route", ["eager", "registered ops"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_shift_with_inplace_backward_and_both_routes(monkeypatch, route, inplace_backward):
    if route == "registered ops":
        monkeypatch.setattr(S._dispatch, "eager", lambda *tensors: False)
    b, t, v = 4, 6, 50
    logits, targets = _tokens(b, t, v, torch.float32)
    weight = torch.rand(v)
    base = logits.clone().requires_grad_(True)
    x = base * 1.0
    loss, scores = cross_entropy_with_scores(x, targets, shift=True, label_smoothing=0.1, weight=weight,
                                             inplace_backward=inplace_backward, per_sample="sum")
    loss.backward()
    want, want_grad = _reference_loss_and_grad(logits, targets, True, "mean", torch.tensor(1.0, dtype=torch.float64),
                                               label_smoothing=0.1, weight=weight)
    _assert_close(loss, want, 3e-5, 3e-5, "loss")
    _assert_close(base.grad, want_grad, *GRAD_TOLERANCES[torch.float32], "gradient")
    if inplace_backward:  # the gradient was written over the caller's [B, T, V] buffer, zero at the last position
        assert torch.equal(x.detach(), base.grad) and (x.detach()[:, -1] == 0).all()
    _assert_per_sample(scores, _reference_per_sample(logits, targets, True, "sum"), "sum", b, t - 1)


def test_both_routes_agree_bit_for_bit(monkeypatch):
    b, t, v = 3, 8, 40
    logits, targets = _tokens(b, t, v, torch.bfloat16)
    weight = torch.rand(v)

    def run():
        x = logits.clone().requires_grad_(True)
        loss, scores = cross_entropy_with_scores(x, targets, shift=True, weight=weight, label_smoothing=0.2, per_sample="none")
        loss.backward()
        return [loss.detach(), x.grad, *[s for s in scores if s is not None],
                *[s for s in softmax_scores(logits, targets, shift=True) if s is not None]]

    eager = run()
    monkeypatch.setattr(S._dispatch, "eager", lambda *tensors: False)
    for a, c in zip(eager, run(), strict=True):
        assert torch.equal(a, c)


# --------------------------------------------------------------------------------------------------
# per-sample scores
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shift", [False, True], ids=["no_shift", "shift"])
@pytest.mark.parametrize("per_sample", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "no_targets"])
def test_softmax_scores_per_sample(dtype, shift, per_sample, with_targets):
    b, t, v = 4, 7, 301
    logits, targets = _tokens(b, t, v, dtype)
    targets[2] = IGNORE  # a sequence of padding only: NaN mean, zero sum
    targets[1, 1:] = IGNORE  # only its first target is real: scored without shift, never with it
    if not with_targets:
        targets = None
    got = softmax_scores(logits, targets, shift=shift, per_sample=per_sample)
    want = _reference_per_sample(logits, targets, shift, per_sample)
    _assert_per_sample(got, want, per_sample, b, t - 1 if shift else t)
    if with_targets and per_sample == "mean":
        assert torch.isnan(got.lse[2]) and torch.isnan(got.loss[2])
        assert torch.isnan(got.entropy[1]) == shift
    if with_targets and per_sample == "sum":
        assert got.lse[2] == 0 and got.loss[2] == 0


def test_per_sample_defaults_to_mean_for_sequences_and_rows_for_matrices():
    logits, targets = _tokens(3, 5, 20, torch.float32)
    assert softmax_scores(logits, targets).lse.shape == (3,)
    default = softmax_scores(logits, targets)
    mean = softmax_scores(logits, targets, per_sample="mean")
    assert all(torch.equal(a, c) for a, c in zip(default, mean) if a is not None)
    flat = softmax_scores(logits.view(15, 20), targets.view(15))
    assert flat.lse.shape == (15,) and flat.argmax is not None
    none = softmax_scores(logits, targets, per_sample="none")
    assert torch.equal(none.lse.view(15), flat.lse) and torch.equal(none.argmax.view(15), flat.argmax)


def test_nan_and_inf_in_ignored_positions_do_not_leak():
    # padding positions (and the last position under shift) may hold garbage: NaN / inf there must
    # not reach the per-sequence scores, the loss or the gradient of the real positions
    b, t, v = 2, 6, 30
    logits, targets = _tokens(b, t, v, torch.float32, ignore_fraction=0.0)
    targets[0, 3] = IGNORE
    logits[0, 2, 5] = float("nan")  # position 2 is scored against targets[0, 3] = IGNORE under shift
    logits[1, -1, :] = float("inf")  # the last position: never scored under shift
    x = logits.clone().requires_grad_(True)
    loss, scores = cross_entropy_with_scores(x, targets, shift=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s).all() for s in scores if s is not None)
    assert torch.isfinite(x.grad).all() and (x.grad[0, 2] == 0).all() and (x.grad[:, -1] == 0).all()
    # (torch's own gradient is NaN on an ignored row holding NaN: the reference reads zeros there instead)
    clean = logits.clone()
    clean[0, 2] = 0.0
    clean[1, -1] = 0.0
    want, want_grad = _reference_loss_and_grad(clean, targets, True, "mean", torch.tensor(1.0, dtype=torch.float64))
    _assert_close(loss, want, 3e-5, 3e-5, "loss")
    _assert_close(x.grad, want_grad, *GRAD_TOLERANCES[torch.float32], "gradient")


# --------------------------------------------------------------------------------------------------
# layouts: no copy when evenly spaced, a copy otherwise
# --------------------------------------------------------------------------------------------------

def _read_pointers(monkeypatch):
    """Records the data pointer of the logits every forward launcher of the Python route is handed
    (the C++ route, aql_kernels._C, switched off)."""
    monkeypatch.setattr(S, "_extension_module", False)
    seen = []
    for name, launcher in list(S._FORWARD.items()):
        def recording(logits, *args, _launcher=launcher, **kwargs):
            seen.append(logits.data_ptr())
            return _launcher(logits, *args, **kwargs)
        monkeypatch.setitem(S._FORWARD, name, recording)
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "padded rows", "sliced positions", "time major", "column stride"])
def test_layouts(monkeypatch, layout):
    b, t, v = 3, 8, 33
    if layout == "contiguous":
        logits = torch.randn(b, t, v)
    elif layout == "padded rows":  # each row padded to 40 columns: still evenly spaced rows
        logits = torch.randn(b, t, 40)[..., :v]
    elif layout == "sliced positions":  # positions 1: of a longer sequence: not evenly spaced
        logits = torch.randn(b, t + 1, v)[:, 1:]
    elif layout == "time major":  # [T, B, V] transposed
        logits = torch.randn(t, b, v).transpose(0, 1)
    else:
        logits = torch.randn(b, t, v * 2)[..., ::2]
    targets = torch.randint(0, v, (b, t))
    targets[0, 4] = IGNORE
    seen = _read_pointers(monkeypatch)
    x = logits.clone() if layout == "contiguous" else logits  # (keeps its strides)
    x.requires_grad_(True)
    loss, scores = cross_entropy_with_scores(x, targets, shift=True, reduction="sum")
    loss.backward()
    # evenly spaced rows reach the launcher as a view (which makes its own unit-column copy, as for
    # 2-D logits); the others are copied before
    assert (seen[-1] == x.data_ptr()) == (layout in ("contiguous", "padded rows", "column stride")), layout
    want, want_grad = _reference_loss_and_grad(x, targets, True, "sum", torch.tensor(1.0, dtype=torch.float64))
    _assert_close(loss, want, 1e-4, 3e-5, "loss")
    _assert_close(x.grad, want_grad, *GRAD_TOLERANCES[torch.float32], "gradient")
    _assert_per_sample(scores, _reference_per_sample(x.detach(), targets, True, "mean"), "mean", b, t - 1)


# --------------------------------------------------------------------------------------------------
# nothing to score
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,shift", [((3, 1, 10), True), ((0, 5, 10), True), ((0, 5, 10), False), ((4, 0, 10), False)],
                         ids=["T=1 shift", "B=0 shift", "B=0", "T=0"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens(shape, shift, reduction):
    b, t, v = shape
    logits = torch.randn(b, t, v, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    loss, scores = cross_entropy_with_scores(logits, targets, shift=shift, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(torch.empty(0, v), torch.empty(0, dtype=torch.int64), reduction=reduction, label_smoothing=0.1)
    assert loss.shape == want.shape and torch.equal(loss.isnan(), want.isnan())
    if reduction != "mean":
        assert (loss == 0).all()
    loss.sum().backward()
    assert logits.grad.shape == shape and (logits.grad == 0).all()
    positions = max(t - 1, 0) if shift else t
    assert scores.lse.shape == (b,) and scores.loss.isnan().all() and (scores.argmax is None)
    none = softmax_scores(logits.detach(), targets, shift=shift, per_sample="none")
    assert none.lse.shape == (b, positions) and none.argmax.shape == (b, positions)
    total = softmax_scores(logits.detach(), targets, shift=shift, per_sample="sum")
    assert (total.loss == 0).all() and total.loss.shape == (b,)


def test_matrix_without_rows_is_an_empty_batch():
    logits = torch.empty(0, 7, requires_grad=True)
    targets = torch.empty(0, dtype=torch.int64)
    for reduction in ("mean", "sum", "none"):
        loss, scores = cross_entropy_with_scores(logits, targets, reduction=reduction)
        want = F.cross_entropy(logits.detach(), targets, reduction=reduction)
        assert loss.shape == want.shape and torch.equal(loss.isnan(), want.isnan()) and scores.lse.shape == (0,)
    loss, _ = cross_entropy_with_scores(logits, targets, reduction="sum")
    loss.backward()
    assert logits.grad.shape == (0, 7)


def test_all_positions_ignored():
    logits = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.full((2, 5), IGNORE)
    for weight in (None, torch.rand(9)):
        loss, scores = cross_entropy_with_scores(logits, targets, shift=True, weight=weight, label_smoothing=0.2)
        want = F.cross_entropy(logits.detach()[:, :-1].reshape(-1, 9), targets[:, 1:].reshape(-1), weight=weight,
                               label_smoothing=0.2)
        assert torch.isnan(loss) and torch.isnan(want) and torch.isnan(scores.loss).all()
        loss_sum, _ = cross_entropy_with_scores(logits, targets, shift=True, weight=weight, label_smoothing=0.2,
                                                reduction="sum")
        (grad,) = torch.autograd.grad(loss_sum, logits)
        assert loss_sum == 0 and (grad == 0).all()


# --------------------------------------------------------------------------------------------------
# 2-D logits: weight and label smoothing, int32 targets
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_matrix_weight_and_smoothing_with_int32_targets(dtype):
    n, v = 41, 1003
    logits = (torch.randn(n, v) * 3).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::5] = IGNORE
    weight = torch.rand(v, dtype=torch.float64)  # any float dtype; used as float32
    x = logits.clone().requires_grad_(True)
    loss, scores = cross_entropy_with_scores(x, targets.to(torch.int32), weight=weight, label_smoothing=0.25)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    want = F.cross_entropy(x64, targets, weight=weight, label_smoothing=0.25, ignore_index=IGNORE)
    want.backward()
    _assert_close(loss, want, 3e-5, 3e-5, "loss")
    _assert_close(x.grad, x64.grad, *GRAD_TOLERANCES[dtype], "gradient")
    nll = F.cross_entropy(logits.double(), targets, ignore_index=IGNORE, reduction="none")
    _assert_close(scores.loss, nll, *SCORE_TOLERANCES, "scores.loss (unweighted, unsmoothed)")


def test_compile_fullgraph_sequences():
    b, t, v = 2, 5, 30
    logits, targets = _tokens(b, t, v, torch.float32)
    weight = torch.rand(v)

    def step(x, y):
        loss, scores = cross_entropy_with_scores(x, y, shift=True, weight=weight, label_smoothing=0.1)
        return loss, scores.entropy, softmax_scores(x.detach(), y, shift=True, per_sample="sum").margin

    x = logits.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, entropy, margin = compiled(x, targets)
    loss.backward()
    x_eager = logits.clone().requires_grad_(True)
    eager_loss, eager_entropy, eager_margin = step(x_eager, targets)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(entropy, eager_entropy, equal_nan=True)
    torch.testing.assert_close(margin, eager_margin)
    torch.testing.assert_close(x.grad, x_eager.grad)


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------

def test_bad_sequence_inputs_raise():
    logits, targets = torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.int64)
    matrix, flat_targets = logits[0], targets[0]
    ce, sm = "aql_kernels.cross_entropy_with_scores", "aql_kernels.softmax_scores"
    cases = [
        (lambda: softmax_scores(matrix, flat_targets, shift=True), ValueError,
         rf"{sm}: shift=True needs 3-D logits \[B, T, V\] with targets \[B, T\], got logits of shape \(5, 7\)"),
        (lambda: cross_entropy_with_scores(matrix, flat_targets, per_sample="mean"), ValueError,
         rf"{ce}: per_sample='mean' needs 3-D logits \[B, T, V\]"),
        (lambda: softmax_scores(logits, targets, per_sample="avg"), ValueError,
         r"per_sample must be None or one of \('mean', 'sum', 'none'\), got 'avg'"),
        (lambda: softmax_scores(logits, targets, shift=1), TypeError, r"shift must be a bool, got int"),
        (lambda: softmax_scores(logits, targets[:, :4]), ValueError,
         r"targets must have shape \[B, T\] = \(2, 5\) \(the logits' first two dimensions\), got \(2, 4\)"),
        (lambda: softmax_scores(logits, flat_targets), ValueError, r"targets must be 2-D, got shape \(5,\)"),
        (lambda: softmax_scores(logits, targets.float()), TypeError, r"targets must have dtype in \(int64, int32\)"),
        (lambda: softmax_scores(torch.randn(2, 5, 0)), ValueError, r"logits must have V >= 1 classes, got shape \(2, 5, 0\)"),
        (lambda: softmax_scores(logits.long()), TypeError, r"logits must have dtype in \(float32, bfloat16, float16\)"),
        (lambda: softmax_scores(logits, targets, ignore_index=1.5), TypeError, r"ignore_index must be an int, got float"),
        (lambda: cross_entropy_with_scores(logits, None, shift=True), TypeError, r"targets must be a torch.Tensor of class indices, got None"),
        (lambda: cross_entropy_with_scores(logits, targets, weight=torch.ones(6)), ValueError,
         r"weight must have one entry per class \(V=7\), got 6"),
        (lambda: cross_entropy_with_scores(logits, targets, weight=torch.ones(7, dtype=torch.int64)), TypeError,
         r"weight must have dtype in \(float32, float64, bfloat16, float16\), got torch.int64"),
        (lambda: cross_entropy_with_scores(logits, targets, weight=torch.ones(7, device="meta")), ValueError,
         r"weight must be on cpu"),
        (lambda: cross_entropy_with_scores(logits, targets, weight=[1.0] * 7), TypeError, r"weight must be a torch.Tensor, got list"),
        (lambda: cross_entropy_with_scores(logits, targets, label_smoothing=1.5), ValueError,
         r"label_smoothing must be in \[0.0, 1.0\], got 1.5"),
        (lambda: cross_entropy_with_scores(logits, targets, label_smoothing=True), TypeError, r"label_smoothing must be a float, got bool"),
        (lambda: cross_entropy_with_scores(logits, targets, label_smoothing=float("nan")), ValueError, r"label_smoothing must be in"),
        (lambda: cross_entropy_with_scores(torch.randn(2, 5, 7, requires_grad=True), targets, inplace_backward=True),
         ValueError, r"inplace_backward cannot write the gradient over a leaf"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()


def test_trainer_reduces_token_rows_through_the_public_path():
    # aql.training.batches.sample_view hands token rows to the kernels as [B, T, V] sequences
    from aql.training.batches import sample_view

    logits, targets = _tokens(3, 4, 11, torch.float32)
    rows, row_targets = logits.view(12, 11), targets.view(12)
    seq_logits, seq_targets = sample_view(rows, row_targets, 3)
    assert seq_logits.shape == (3, 4, 11) and seq_logits.data_ptr() == rows.data_ptr()
    per_token, scores = cross_entropy_with_scores(seq_logits, seq_targets, reduction="none")
    assert per_token.shape == (12,) and scores.lse.shape == (3,)
    _assert_per_sample(scores, _reference_per_sample(logits, targets, False, "mean"), "mean", 3, 4)
    same_logits, same_targets = sample_view(rows, row_targets, 12)  # one row per sample: unchanged
    assert same_logits is rows and same_targets is row_targets


@pytest.mark.parametrize("name", ["reference", "native", "triton"])
def test_sequences_on_every_implementation(monkeypatch, name):
    # the sequence layer hands every implementation the same [B * T, V] rows (padded rows here)
    if name == "native" and not S._native.CPU.has("aql_softmax_scores"):
        pytest.skip("the CPU library is not built (`make native`)")
    if name == "triton" and not S._dispatch.triton_status().available:
        pytest.skip(S._dispatch.triton_status().detail)
    monkeypatch.setattr(S, "_choose", lambda device: name)
    monkeypatch.setattr(S, "_extension_module", False)  # the Python route's launchers, each in turn
    b, t, v = 3, 5, 70
    padded = torch.randn(b, t, v + 6) * 2
    targets = torch.randint(0, v, (b, t))
    targets[1, 2] = IGNORE
    x = padded[..., :v].requires_grad_(True)
    weight = torch.rand(v)
    loss, scores = cross_entropy_with_scores(x, targets, shift=True, weight=weight, label_smoothing=0.2, reduction="sum")
    loss.backward()
    want, want_grad = _reference_loss_and_grad(x, targets, True, "sum", torch.tensor(1.0, dtype=torch.float64),
                                               weight=weight, label_smoothing=0.2)
    _assert_close(loss, want, 1e-4, 3e-5, "loss")
    _assert_close(x.grad, want_grad, *GRAD_TOLERANCES[torch.float32], "gradient")
    _assert_per_sample(scores, _reference_per_sample(x.detach(), targets, True, "mean"), "mean", b, t - 1)


def test_tracing_modes_see_sequences_through_the_registered_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(3, 6, 40, requires_grad=True)
        targets = torch.zeros(3, 6, dtype=torch.int64)
        scores = softmax_scores(logits.detach(), targets, shift=True, per_sample="none")
        loss, per_sequence = cross_entropy_with_scores(logits, targets, shift=True, label_smoothing=0.1,
                                                       weight=torch.ones(40), reduction="none")
    assert scores.lse.shape == (3, 5) and scores.argmax.shape == (3, 5)
    assert loss.shape == (15,) and per_sequence.entropy.shape == (3,) and per_sequence.argmax is None


def test_int32_targets_with_shift_and_a_wide_ignore_index():
    # the shifted targets are int64: an ignore_index outside int32 still fills the last column
    b, t, v = 2, 5, 12
    logits = torch.randn(b, t, v, requires_grad=True)
    targets = torch.randint(0, v, (b, t), dtype=torch.int32)
    wide = -(2**40)
    loss, scores = cross_entropy_with_scores(logits, targets, shift=True, ignore_index=wide, reduction="sum")
    loss.backward()
    x64 = logits.detach().double().requires_grad_(True)
    want = F.cross_entropy(x64[:, :-1].reshape(-1, v), targets[:, 1:].reshape(-1).long(), reduction="sum")
    want.backward()
    _assert_close(loss, want, 1e-4, 3e-5, "loss")
    _assert_close(logits.grad, x64.grad, *GRAD_TOLERANCES[torch.float32], "gradient")


@pytest.mark.parametrize("shape", [(6, 9), (2, 3, 9)], ids=["matrix", "sequences"])
def test_scores_changed_in_place_before_backward(shape):
    # the loss saves lse for its backward: changing another field in place must not look like a
    # change of lse to autograd (one shared buffer would share its version counter)
    logits = torch.randn(*shape, requires_grad=True)
    targets = torch.randint(0, 9, shape[:-1])
    options = {"per_sample": "none"} if len(shape) == 3 else {}
    loss, scores = cross_entropy_with_scores(logits * 1.0, targets, **options)
    for field in ("entropy", "maxprob", "margin", "loss", "el2n"):
        getattr(scores, field).mul_(2.0)
    loss.backward()
    x64 = logits.detach().double().requires_grad_(True)
    F.cross_entropy(x64.reshape(-1, 9), targets.reshape(-1)).backward()
    _assert_close(logits.grad, x64.grad, *GRAD_TOLERANCES[torch.float32], "gradient")
