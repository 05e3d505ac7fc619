"""aql_kernels._native: the Python side of the C ABI checked against csrc/c_api.h (enums, signatures),
status codes as exceptions, the thread-safe first load, and every instruction-set variant of the CPU
library against the float64 references."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import _native
from aql_kernels import fisher as fisher_module
from aql_kernels import scores as S
from aql_kernels import select as sel
from aql_kernels._native import CPU, CpuIsa, DType, Status
from tests.kernels.test_scores import TOLERANCES, _adversarial, _assert_scores_close, _expected, _random_logits

HEADER = Path(_native.__file__).resolve().parent / "csrc" / "c_api.h"


def _header() -> str:
    text = HEADER.read_text()
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)  # without comments


def _require_cpu_library():
    if not CPU.available:
        pytest.skip(f"the CPU library is not built here ({CPU.reason}); `make native` builds it")


# ---------------------------------------------------------------------------------------------------
# one definition of every C enum and signature in Python, checked against the header
# ---------------------------------------------------------------------------------------------------
def test_enums_match_the_c_header():
    values = {name: int(value) for name, value in re.findall(r"\b(AQL_[A-Z0-9_]+)\s*=\s*(-?\d+)", _header())}
    families = {"AQL_ERR_": Status, "AQL_DTYPE_": DType, "AQL_CPU_ISA_": CpuIsa}
    seen = {enum: set() for enum in families.values()}
    for name, value in values.items():
        if name == "AQL_OK":
            enum, member = Status, "OK"
        else:
            prefix = next((p for p in families if name.startswith(p)), None)
            assert prefix is not None, f"{name} in c_api.h belongs to no Python enum of aql_kernels._native"
            enum, member = families[prefix], name[len(prefix):]
        assert member in enum.__members__, f"{name} = {value} in c_api.h has no {enum.__name__}.{member}"
        assert enum[member] == value, f"{enum.__name__}.{member} = {int(enum[member])}, c_api.h says {name} = {value}"
        seen[enum].add(member)
    for enum, members in seen.items():
        assert members == set(enum.__members__), f"{enum.__name__} has members c_api.h lacks: {set(enum.__members__) - members}"
    abi = re.search(r"#define\s+AQL_ABI_VERSION\s+(\d+)", _header())
    assert abi and int(abi.group(1)) == _native._ABI_VERSION
    assert _native.DTYPE_CODES == {"float32": DType.F32, "bfloat16": DType.BF16, "float16": DType.F16}


_C_TYPES = {"aql_status": ctypes.c_int32, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64,
            "size_t": ctypes.c_size_t, "double": ctypes.c_double}


def _ctype_of(declaration: str):
    """The ctypes type that a C parameter or return type is passed as ("pointer" for any data pointer)."""
    words = declaration.replace("*", " * ").split()
    if "*" in words:
        return ctypes.c_char_p if words == ["const", "char", "*"] else "pointer"
    (word,) = [w for w in words if w != "const"]
    return _C_TYPES[word]


def _declarations() -> dict[str, tuple]:
    """name -> (return type, [parameter types]) of every AQL_API function of c_api.h."""
    found = {}
    for restype, name, params in re.findall(r"AQL_API\s+([\w\s\*]+?)\s*\b(aql_\w+)\s*\(([^)]*)\)\s*;", _header()):
        params = " ".join(params.split())
        types = [] if params in ("", "void") else [re.sub(r"\s*\b\w+$", "", p.strip()) for p in params.split(",")]
        found[name] = (restype.strip(), types)
    return found


def test_every_c_function_has_one_signature_in_python():
    declared = _declarations()
    assert "aql_num_threads" in declared and len(declared) >= 12
    assert set(declared) == set(_native._SIGNATURES), (set(declared) ^ set(_native._SIGNATURES))
    for name, (restype, params) in declared.items():
        py_restype, py_argtypes = _native._SIGNATURES[name]
        assert py_restype is _ctype_of(restype), f"{name}: returns {restype}, restype {py_restype}"
        assert len(py_argtypes) == len(params), f"{name}: {len(py_argtypes)} argtypes, c_api.h has {len(params)} parameters"
        for i, (py, c) in enumerate(zip(py_argtypes, params)):
            want = _ctype_of(c)
            if want == "pointer":
                assert py is ctypes.c_void_p or issubclass(py, ctypes._Pointer), f"{name} argument {i}: {c} passed as {py}"
            else:
                assert py is want, f"{name} argument {i}: {c} passed as {py.__name__}"


def test_the_cpu_library_exports_its_functions_with_their_signatures():
    _require_cpu_library()
    for name in _native._SIGNATURES:
        if name.startswith("aql_cuda_"):
            continue
        assert CPU.has(name), name
        function = CPU.function(name)
        assert function.restype is _native._SIGNATURES[name][0], name
    assert CPU.num_threads() >= 1  # (restype set by the table: aql_num_threads returns an int32)


# ---------------------------------------------------------------------------------------------------
# status codes -> exceptions
# ---------------------------------------------------------------------------------------------------
def test_status_codes_become_exceptions():
    with pytest.raises(MemoryError, match=r"aql_x failed \(out of memory\): no room"):
        _native.raise_for_status("aql_x", Status.OUT_OF_MEMORY, "no room")
    with pytest.raises(_native.NativeError, match=r"aql_x failed \(internal\): broken") as error:
        _native.raise_for_status("aql_x", Status.INTERNAL, "broken")
    assert isinstance(error.value, RuntimeError) and not isinstance(error.value, MemoryError)
    with pytest.raises(ValueError, match=r"aql_kernels.softmax_scores: target 9"):
        _native.raise_for_status("aql_softmax_scores", Status.TARGET_OUT_OF_RANGE, "target 9", "softmax_scores")
    with pytest.raises(_native.NativeError, match=r"\(invalid argument\)"):
        _native.raise_for_status("aql_x", Status.INVALID_ARGUMENT, "bad")


def test_native_out_of_memory_is_a_memory_error():
    # 2**62 indices need a 4 EiB scratch mask: the allocation fails before any score is read
    if not CPU.has("aql_topk_select"):
        pytest.skip("the CPU library is not built here")
    scores, indices = torch.zeros(4), torch.empty(1, dtype=torch.int64)
    with pytest.raises(MemoryError, match=r"aql_topk_select: out of host memory"):
        CPU.call("aql_topk_select", scores.data_ptr(), 2**62, 1, None, indices.data_ptr(), None)


# ---------------------------------------------------------------------------------------------------
# the first load, from two threads at once
# ---------------------------------------------------------------------------------------------------
def test_two_threads_see_a_fully_loaded_library(monkeypatch):
    _require_cpu_library()
    library = _native.NativeLibrary("cpu", "libaql_cpu.so")  # a fresh, not yet loaded instance
    inside, release = threading.Event(), threading.Event()
    real_cdll = ctypes.CDLL

    def slow_cdll(*args, **kwargs):
        inside.set()
        release.wait(5)  # the first thread holds the load open while the second one asks
        return real_cdll(*args, **kwargs)

    monkeypatch.setattr(_native.ctypes, "CDLL", slow_cdll)
    answers = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", library.has("aql_softmax_scores")))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=lambda: answers.setdefault("second", (library.has("aql_softmax_scores"), library.reason)))
    second.start()
    second.join(0.2)  # it must wait for the load, not answer from a half-loaded library
    release.set()
    first.join(5)
    second.join(5)
    assert answers["first"] is True
    assert answers["second"] == (True, ""), answers


# ---------------------------------------------------------------------------------------------------
# instruction-set variants of the CPU library
# ---------------------------------------------------------------------------------------------------
# (`cpu_variant`, the fixture, is in tests/kernels/conftest.py)
@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
def test_every_cpu_variant_matches_the_references(cpu_variant):
    # scores: several chunks per row (V > 4096), special rows, every dtype; the gradient
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits, targets = _adversarial(9000, dtype, "cpu")
        huge = logits.float().nan_to_num(0, 0, 0).abs().amax(dim=1).double()
        got = S._FORWARD["native"](logits, targets, -100)
        _assert_scores_close(got, _expected(logits, targets), *TOLERANCES[dtype], atol_rows=4e-7 * huge)
    logits = _random_logits(7, 1003, torch.float32, "cpu")
    targets = torch.randint(0, 1003, (7,))
    lse = S.softmax_scores_reference(logits, targets).lse
    grad = S._BACKWARD["native"](logits, targets, lse, torch.ones(7), -100, torch.full_like(logits, float("nan")))
    x64 = logits.double().requires_grad_(True)
    F.cross_entropy(x64, targets, reduction="sum").backward()
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-7, rtol=1e-5)
    # select: the parallel path (more than 2**20 scores) and ties
    scores = torch.randn(2**20 + 3)
    scores[::7] = 0.5
    for k in (1, 2**18, 2**20):
        assert torch.equal(sel._run(scores, k, "mask", "native"), sel.topk_mask_reference(scores, k))
    # fisher: float32 and both 16-bit gradients, odd sizes
    states = [torch.rand(n) for n in (1, 33, 70001)]
    grads = [torch.randn(n).to(dtype) for n, dtype in zip((1, 33, 70001), (torch.float32, torch.bfloat16, torch.float16))]
    expected = [0.9 * s.double() + 0.1 * (0.5 * g.double()) ** 2 for s, g in zip(states, grads)]
    fisher_module.IMPLEMENTATIONS["native"](states, grads, 0.9, scale=0.5)
    for state, want in zip(states, expected):
        torch.testing.assert_close(state.double(), want.float().double(), rtol=4e-6, atol=1e-30)


@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
def test_every_cpu_variant_keeps_the_target_out_of_the_sums(cpu_variant):
    """The forward keeps the target column out of s' and q' with a lane mask in the one vector that
    holds it and adds exp(x_t - max) to s afterwards: targets at the first and last lane of a vector,
    at chunk edges (4096), in the last partial vector, with p_t near 1 (el2n without cancellation)
    and with the target the row's maximum, every row checked against the float64 reference."""
    v = 2 * 4096 + 37
    columns = [0, 1, 15, 16, 31, 32, 4095, 4096, 4097, 8191, 8192, v - 37, v - 2, v - 1]
    torch.manual_seed(11)
    logits = torch.randn(3 * len(columns), v) * 2
    targets = torch.tensor(columns * 3)
    rows = torch.arange(len(columns))
    logits[len(columns) + rows, targets[: len(columns)]] = 40.0  # p_t = 1 - ~1e-14: q' and s' tiny
    logits[2 * len(columns) + rows, targets[: len(columns)]] = 9.0  # the target is the maximum, p_t ~ 0.3
    got = S._FORWARD["native"](logits, targets, -100)
    _assert_scores_close(got, _expected(logits, targets), *TOLERANCES[torch.float32])
    el2n = got.el2n[len(columns): 2 * len(columns)].double()
    want = _expected(logits, targets).el2n[len(columns): 2 * len(columns)]
    torch.testing.assert_close(el2n, want, rtol=1e-4, atol=0)  # relative, on values of ~1e-7


@pytest.mark.parametrize("cpu_variant", list(CpuIsa), ids=lambda isa: isa.name.lower(), indirect=True)
def test_every_cpu_variant_one_pass_chunks_and_their_fallback(cpu_variant):
    """The float32 forward sums a chunk in one pass relative to a guessed shift (the running maximum,
    or the maximum of the row's first 256 logits) and redoes it in two passes when its maximum lies
    more than 8 above the guess: rows on both sides of that limit, in the first chunk and later ones,
    with -inf heads, +inf and NaN in later chunks, against the float64 reference."""
    v = 3 * 4096 + 21
    torch.manual_seed(5)
    logits = torch.randn(19, v)
    targets = torch.randint(0, v, (19,))
    logits[16, 100] = float("nan")                       # NaN inside the head that gives the guess
    logits[17, 5000] = float("nan")                      # NaN and +inf in one later chunk
    logits[17, 5001] = float("inf")
    logits[18, 4096 + 16 * 7 + 3] = float("nan")         # NaN in a kept chunk, lane 3 of a vector
    logits[18, 4096 + 16 * 7 + 19] = logits[18].nan_to_num(0).max() + 1.0
    logits[0, 300] = 7.9 + logits[0, :256].max()         # first chunk, just within the lag: kept, rescaled by e^-7.9
    logits[1, 300] = 8.5 + logits[1, :256].max()         # first chunk, beyond it: two passes
    logits[2, 5000] = 30.0                               # a later chunk far above the running maximum
    logits[3, 4096:] += 7.5                              # every later chunk a little above: several rescales
    logits[4, :256] = float("-inf")                      # no finite guess from the head
    logits[5, :4096] = float("-inf")                     # the first chunk all -inf, the next one finite
    logits[6, 9000] = float("inf")                       # +inf in a later chunk
    logits[7, 9000] = float("nan")                       # NaN in a later chunk: argmax is its index
    logits[8] = float("-inf")                            # only -inf
    logits[9, :256] -= 100.0                             # the head far below the rest
    logits[10, 4096:8192] = float("-inf")                # an all -inf chunk between finite ones
    logits[11] *= 1e-30                                  # tiny logits: the maximum near 0
    logits[12] = logits[12] * 3 + 1e4                    # huge offsets
    logits[13, torch.randint(0, v, (40,))] = logits[13].max() + 7.99   # many ties for the maximum
    targets[14] = 300
    logits[14, 300] = 40.0                               # p_t near 1 in the first chunk, beyond the lag
    targets[15] = -100
    got = S._FORWARD["native"](logits, targets, -100)
    huge = logits.nan_to_num(0, 0, 0).abs().amax(dim=1).double()
    _assert_scores_close(got, _expected(logits, targets), *TOLERANCES[torch.float32], atol_rows=4e-7 * huge)


def test_setting_an_unknown_variant_is_refused():
    if not CPU.has("aql_cpu_set_isa"):
        pytest.skip("the CPU library is not built here, or without runtime dispatch")
    assert CPU.function("aql_cpu_set_isa")(99) == Status.UNSUPPORTED
    assert "variant 99 was not built" in CPU.last_error()


_ENVIRONMENT_SCRIPT = r"""
import ctypes, sys
library = ctypes.CDLL(sys.argv[1])
library.aql_last_error.restype = ctypes.c_char_p
status = library.aql_topk_select(None, ctypes.c_int64(0), ctypes.c_int64(0), None, None, None)
print(library.aql_cpu_isa(), status, library.aql_last_error().decode())
"""


@pytest.mark.parametrize("value, isa", [("baseline", CpuIsa.BASELINE), ("sse9", None)])
def test_the_environment_caps_the_variant_or_is_refused(value, isa):
    """AQL_CPU_ISA=baseline runs the baseline kernels; a name the library does not know makes every
    call fail and say why (not silently ignored). In a fresh process: the choice is made at the first call."""
    if not CPU.has("aql_cpu_set_isa"):
        pytest.skip("the CPU library is not built here, or without runtime dispatch")
    done = subprocess.run([sys.executable, "-c", _ENVIRONMENT_SCRIPT, str(CPU.path)], capture_output=True, text=True,
                          env={"AQL_CPU_ISA": value}, timeout=60)
    assert done.returncode == 0, done.stderr
    reported, status, message = done.stdout.rstrip("\n").split(" ", 2)
    if isa is not None:
        assert (int(reported), int(status)) == (isa, Status.OK)
    else:
        assert (int(reported), int(status)) == (-1, Status.INVALID_ARGUMENT)
        assert "AQL_CPU_ISA must be one of baseline, avx2, avx512, native, got 'sse9'" in message
