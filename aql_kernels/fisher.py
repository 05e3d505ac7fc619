"""Multi-tensor squared-gradient Fisher EMA: the diagonal Fisher that the Laplace estimator keeps.

    fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i]) ** 2      (None grad: unchanged)

Memory traffic: one read of each fisher element, one read of each gradient element and one write of
each fisher element (12 bytes per float32 parameter, 10 for bfloat16 / float16 gradients). The torch
peer, ``torch._foreach_mul_`` followed by ``torch._foreach_addcmul_``, reads the state twice and
writes it twice (20 bytes per parameter).

The whole parameter list is one launch. On CUDA the Triton kernel reads the tensors' addresses from
a device table (int64 addresses, element counts and gradient dtype codes, cached while the list of
tensors is unchanged) and a flat table of work items, one per block of BLOCK elements of one tensor,
so that one huge tensor and a hundred tiny ones keep every program equally busy. This is the
multi-tensor-apply pattern of NVIDIA Apex (``csrc/multi_tensor_apply.cuh``) with the chunk list built
once on the host instead of on every call. On CPU the C++ library splits the concatenated element
range of all tensors evenly across the OpenMP threads.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
from typing import Optional

import torch

from . import _native
from ._dispatch import choose
from ._validation import FLOAT_DTYPES

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or broken: the dispatcher reports it and falls back
    triton = None

__all__ = ["fisher_ema_", "fisher_ema_reference", "IMPLEMENTATIONS"]

_OP = "fisher_ema_"
_GRAD_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Elements per Triton program: 16 KiB of float32 state, 32 values per thread with 4 warps.
_BLOCK = 4096
_FLOAT32_MAX = torch.finfo(torch.float32).max

# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_as_float32(pointer, offsets, numel, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(pointer + offsets, mask=offsets < numel, other=0.0).to(tl.float32)
        return tl.load(pointer + offsets).to(tl.float32)

    @triton.jit
    def _fisher_ema_block(state_pointer, grad_f32, grad_bf16, grad_f16, code, offsets, numel, decay, one_minus_decay,
                          scale, MASKED: tl.constexpr):
        if code == 0:
            grad = _load_as_float32(grad_f32, offsets, numel, MASKED)
        elif code == 1:
            grad = _load_as_float32(grad_bf16, offsets, numel, MASKED)
        else:
            grad = _load_as_float32(grad_f16, offsets, numel, MASKED)
        state = _load_as_float32(state_pointer, offsets, numel, MASKED)
        scaled = grad * scale
        fresh = decay * state + one_minus_decay * (scaled * scaled)
        if MASKED:
            tl.store(state_pointer + offsets, fresh, mask=offsets < numel)
        else:
            tl.store(state_pointer + offsets, fresh)

    @triton.jit
    def _fisher_ema_kernel(
        table,  # int64 [4, T]: fisher addresses, gradient addresses, element counts, gradient dtype codes
        work,  # int64 [P]: (tensor index << 32) | block index within that tensor, one per program
        tensor_count,
        decay,
        one_minus_decay,  # formed in double on the host: 1 - float32(0.999) is 1.3e-5 off 0.001
        scale,
        BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes: lets the accesses vectorise
    ):
        """f = decay * f + (1 - decay) * (scale * g)^2 over one block of one tensor of the list.

        One read of f and g and one write of f. The addresses come from `table` because the list has
        tensors of different sizes and dtypes that no single base pointer reaches; the dtype branch
        is uniform across a program. Full blocks run unmasked: a mask against an element count read
        from memory has unknown alignment and would keep the accesses scalar (checked in the PTX for
        sm_90: 16-byte ld/st.global.v4 only on the unmasked path).
        """
        item = tl.load(work + tl.program_id(0))
        index = item >> 32
        block = item & 0xFFFFFFFF
        state_pointer = tl.load(table + index).to(tl.pointer_type(tl.float32))
        grad_address = tl.load(table + tensor_count + index)
        numel = tl.load(table + 2 * tensor_count + index)
        code = tl.load(table + 3 * tensor_count + index)
        grad_f32 = grad_address.to(tl.pointer_type(tl.float32))
        grad_bf16 = grad_address.to(tl.pointer_type(tl.bfloat16))
        grad_f16 = grad_address.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            state_pointer = tl.multiple_of(state_pointer, 16)
            grad_f32 = tl.multiple_of(grad_f32, 16)
            grad_bf16 = tl.multiple_of(grad_bf16, 16)
            grad_f16 = tl.multiple_of(grad_f16, 16)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        if (block + 1) * BLOCK <= numel:
            _fisher_ema_block(state_pointer, grad_f32, grad_bf16, grad_f16, code, offsets, numel, decay, one_minus_decay, scale,
                              MASKED=False)
        else:
            _fisher_ema_block(state_pointer, grad_f32, grad_bf16, grad_f16, code, offsets, numel, decay, one_minus_decay, scale,
                              MASKED=True)

# Device tables, keyed on what they encode, so a training loop that passes the same tensors every
# step uploads them once. Least recently used entries go first.
_TABLE_CACHE_SIZE = 16
_address_tables: collections.OrderedDict = collections.OrderedDict()
_work_tables: collections.OrderedDict = collections.OrderedDict()


def _cached(cache: collections.OrderedDict, key, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > _TABLE_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _upload(values: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 tensor on `device` without a host sync: pinned host buffer + asynchronous copy.

    Returns (device tensor, host tensor); the host buffer stays referenced with the cache entry.
    """
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.int64).pin_memory()
        return host.to(device, non_blocking=True), host
    host = torch.tensor(values, dtype=torch.int64, device=device)
    return host, host


def _fisher_ema_triton_launch(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float, scale: float) -> None:
    device = pairs[0][0].device
    addresses = [(f.data_ptr(), g.data_ptr(), f.numel(), _GRAD_CODES[g.dtype]) for f, g in pairs]
    numels = tuple(entry[2] for entry in addresses)

    def build_work():
        items = [(index << 32) | block for index, numel in enumerate(numels) for block in range(triton.cdiv(numel, _BLOCK))]
        return _upload(items, device)

    def build_table():
        columns = [entry[column] for column in range(4) for entry in addresses]
        return _upload(columns, device)

    work, _ = _cached(_work_tables, (device, _BLOCK, numels), build_work)
    table, _ = _cached(_address_tables, (device, tuple(addresses)), build_table)
    aligned = all(entry[0] % 16 == 0 and entry[1] % 16 == 0 for entry in addresses)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _fisher_ema_kernel[(work.numel(),)](table, work, len(addresses), decay, 1.0 - decay, scale, BLOCK=_BLOCK,
                                             ALIGNED=aligned, num_warps=4)


# ---------------------------------------------------------------------------------------------------
# Input checks and the work list
# ---------------------------------------------------------------------------------------------------
def _validate(op: str, fisher, grads, decay, scale) -> None:
    name = f"aql_kernels.{op}"
    if not isinstance(fisher, (list, tuple)):
        raise TypeError(f"{name}: fisher must be a list of tensors, got {type(fisher).__name__}")
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{name}: grads must be a list of tensors or None, got {type(grads).__name__}")
    if len(fisher) != len(grads):
        raise ValueError(f"{name}: fisher and grads must have the same length, got {len(fisher)} and {len(grads)}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"{name}: decay must be a float, got {type(decay).__name__} {decay!r}")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"{name}: decay must be in [0, 1), got {decay}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: scale must be a float, got {type(scale).__name__} {scale!r}")
    if not abs(float(scale)) <= _FLOAT32_MAX:
        raise ValueError(f"{name}: scale must be finite in float32 (|scale| <= {_FLOAT32_MAX:.4g}), got {scale}")
    device = None
    for i, (state, grad) in enumerate(zip(fisher, grads)):
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name}: fisher[{i}] must be a torch.Tensor, got {type(state).__name__}")
        if state.dtype != torch.float32:
            raise TypeError(f"{name}: fisher[{i}] must be float32, got {state.dtype}")
        if not state.is_contiguous():
            raise ValueError(f"{name}: fisher[{i}] must be contiguous, got strides {state.stride()} for shape {tuple(state.shape)}")
        if device is None:
            device = state.device
        elif state.device != device:
            raise ValueError(f"{name}: fisher[{i}] must be on {device} (like fisher[0]), got {state.device}")
        if grad is None:
            continue
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"{name}: grads[{i}] must be a torch.Tensor or None, got {type(grad).__name__}")
        if grad.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: grads[{i}] must have dtype in (float32, bfloat16, float16), got {grad.dtype}")
        if grad.shape != state.shape:
            raise ValueError(f"{name}: grads[{i}] must have the shape of fisher[{i}] {tuple(state.shape)}, got {tuple(grad.shape)}")
        if grad.device != device:
            raise ValueError(f"{name}: grads[{i}] must be on {device} (like fisher[0]), got {grad.device}")


def _pairs(op: str, fisher, grads) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (state, contiguous gradient) pairs that have work; runs on real tensors only.

    A non-contiguous gradient is copied to a contiguous one (one extra pass over that tensor).
    """
    _check_distinct(op, fisher, grads)
    return [(state, grad if grad.is_contiguous() else grad.contiguous())
            for state, grad in zip(fisher, grads) if grad is not None and state.numel() != 0]


def _check_distinct(op: str, fisher, grads) -> None:
    """Each state that gets updated appears once: updating one twice in one call has no sequential meaning."""
    seen = set()
    for state, grad in zip(fisher, grads):
        if grad is None or state.numel() == 0:
            continue
        address = state.data_ptr()
        if address in seen:
            raise ValueError(f"aql_kernels.{op}: the same fisher tensor appears twice in the list (address {address:#x})")
        seen.add(address)


# ---------------------------------------------------------------------------------------------------
# The three implementations (each validates like the public function)
# ---------------------------------------------------------------------------------------------------
def fisher_ema_reference(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """The spec, with torch's foreach ops (two passes over the state)."""
    _validate("fisher_ema_reference", fisher, grads, decay, scale)
    _check_distinct("fisher_ema_reference", fisher, grads)
    pairs = [(f, g) for f, g in zip(fisher, grads) if g is not None]
    if not pairs:
        return
    states = [f for f, _ in pairs]
    scaled = torch._foreach_mul([g.float() for _, g in pairs], float(scale))
    torch._foreach_mul_(states, float(decay))
    torch._foreach_addcmul_(states, scaled, scaled, value=1.0 - float(decay))


def _fisher_ema_native_unchecked(fisher, grads, decay: float, scale: float) -> None:
    pairs = _pairs(_OP, fisher, grads)
    if not pairs:
        return
    if pairs[0][0].device.type != "cpu":
        raise ValueError(f"aql_kernels.{_OP}: the native implementation runs on CPU tensors, got {pairs[0][0].device}")
    count = len(pairs)
    states = (ctypes.c_void_p * count)(*[f.data_ptr() for f, _ in pairs])
    gradients = (ctypes.c_void_p * count)(*[g.data_ptr() for _, g in pairs])
    codes = (ctypes.c_int32 * count)(*[_GRAD_CODES[g.dtype] for _, g in pairs])
    numels = (ctypes.c_int64 * count)(*[f.numel() for f, _ in pairs])
    _native.CPU.call("aql_fisher_ema", count, states, gradients, codes, numels, float(decay), float(scale))


def _fisher_ema_triton_unchecked(fisher, grads, decay: float, scale: float) -> None:
    if triton is None:
        raise RuntimeError(f"aql_kernels.{_OP}: the Triton implementation needs triton, which does not import here")
    pairs = _pairs(_OP, fisher, grads)
    if pairs:
        _fisher_ema_triton_launch(pairs, float(decay), float(scale))


def _fisher_ema_reference_unchecked(fisher, grads, decay: float, scale: float) -> None:
    fisher_ema_reference(fisher, grads, decay, scale=scale)


def _fisher_ema_native(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """C++ / OpenMP implementation (CPU tensors)."""
    _validate(_OP, fisher, grads, decay, scale)
    _fisher_ema_native_unchecked(fisher, grads, decay, scale)


def _fisher_ema_triton(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """Triton implementation: one launch for the whole list (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    _validate(_OP, fisher, grads, decay, scale)
    _fisher_ema_triton_unchecked(fisher, grads, decay, scale)


_RUNNERS = {
    "reference": _fisher_ema_reference_unchecked,
    "native": _fisher_ema_native_unchecked,
    "triton": _fisher_ema_triton_unchecked,
}


# ---------------------------------------------------------------------------------------------------
# torch.library op and the public function
# ---------------------------------------------------------------------------------------------------
def _fisher_ema_op(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, scale: float) -> None:
    if len(fisher) == 0:
        return
    key = choose(_OP, fisher[0].device, native_symbol="aql_fisher_ema")
    _RUNNERS[key](fisher, grads, decay, scale)


# Defined with torch.library.Library rather than torch.library.custom_op: the latter's Python wrapper
# cost ~0.5 ms per call on a list of 148 tensors (GPT-2 small) on the CI-class CPU, against ~0.1 ms
# here, and on a GPU that host time is as long as the kernel itself.
_LIBRARY = torch.library.Library("aql", "FRAGMENT")
_LIBRARY.define("fisher_ema_(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float scale) -> ()")
_LIBRARY.impl("fisher_ema_", _fisher_ema_op, "CompositeExplicitAutograd")


@torch.library.register_fake("aql::fisher_ema_", lib=_LIBRARY)
def _fisher_ema_fake(fisher, grads, decay, scale) -> None:
    return None


def fisher_ema_(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """In place, for every i with grads[i] not None:
    fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i]) ** 2.

    fisher: float32 contiguous tensors, all on one device; grads: float32 / bfloat16 / float16 tensors
    (or None) of the same shapes on the same device (a non-contiguous gradient is copied first);
    0 <= decay < 1; scale finite (e.g. 1 / loss_scale for scaled gradients, or the batch size to turn
    the gradient of a mean loss into that of a sum). One kernel launch for the whole list on CUDA; no
    host synchronisation.
    """
    _validate(_OP, fisher, grads, decay, scale)
    torch.ops.aql.fisher_ema_.default(list(fisher), list(grads), float(decay), float(scale))


IMPLEMENTATIONS = {
    "reference": fisher_ema_reference,
    "native": _fisher_ema_native,
    "triton": _fisher_ema_triton,
}
