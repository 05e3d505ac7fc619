"""Multi-tensor squared-gradient Fisher EMA: the diagonal Fisher that the Laplace estimator keeps.

    fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i]) ** 2      (None grad: unchanged)

Memory traffic: one read of each fisher element, one read of each gradient element and one write of
each fisher element (12 bytes per float32 parameter, 10 for bfloat16 / float16 gradients). The torch
peer, ``torch._foreach_mul_`` followed by ``torch._foreach_addcmul_``, reads the state twice and
writes it twice (20 bytes per parameter).

The whole parameter list is one launch. On CUDA the Triton kernel runs a persistent grid (a few
programs per SM). The list is cut into tiles of BLOCK elements, none straddling two tensors, and
program p takes one contiguous run of tiles, so every program gets the same number of tiles
whatever the mix of one huge embedding and a hundred biases. A program walks its run tensor by
tensor: it reads a tensor's addresses, element count and gradient dtype from a device table once,
then streams that tensor's tiles in an inner loop with no lookup at all. This is the
multi-tensor-apply pattern of NVIDIA Apex (``csrc/multi_tensor_apply.cuh``) with the chunk list
replaced by arithmetic on a cached table. On CPU the C++ library splits the concatenated element
range of all tensors evenly across the OpenMP threads.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import functools
import itertools
import operator
from typing import NamedTuple, Optional

import torch

from . import _dispatch, _native
from ._validation import FLOAT_DTYPES

try:
    import triton
    import triton.language as tl
except Exception:  # triton missing or broken: the dispatcher reports it and falls back
    triton = None

__all__ = ["fisher_ema_", "fisher_ema_reference", "IMPLEMENTATIONS"]

_OP = "fisher_ema_"
# Element-type codes of the gradients: the C ABI's (AQL_DTYPE_*), which the Triton table uses too.
_GRAD_CODES = {torch.float32: int(_native.DType.F32), torch.bfloat16: int(_native.DType.BF16),
               torch.float16: int(_native.DType.F16)}
_FLOAT32_MAX = torch.finfo(torch.float32).max
# Elements per tile: 16 per thread with 8 warps, four 16-byte loads of the state and four of a float32
# gradient in flight per thread and iteration. ptxas (sm_90a, triton 3.6) gives the kernel 58
# registers (64 on sm_80), so 4 programs of 256 threads fit on an SM at once (32 warps, 128 KiB of loads
# in flight): well above the ~36 KB per SM that a ~1 us DRAM latency at 4.8 TB/s over 132 SMs asks
# for. Tiles of 8192 with 8 warps (32 elements per thread) cost 226 registers: one program per SM.
_BLOCK = 4096
_NUM_WARPS = 8
_PROGRAMS_PER_SM = 4
# Programs when the kernel runs in the interpreter (CPU tensors under TRITON_INTERPRET=1).
_INTERPRETER_PROGRAMS = 4

# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
if triton is not None:
    _CODE_F32 = tl.constexpr(_GRAD_CODES[torch.float32])
    _CODE_BF16 = tl.constexpr(_GRAD_CODES[torch.bfloat16])

    @triton.jit
    def _fisher_ema_tiles(state_pointer, grad_pointer, first, stop, numel, decay, one_minus_decay, scale,
                          BLOCK: tl.constexpr):
        """Tiles [first, stop) of one tensor. Only a tensor's last tile can be partial, so the loop runs
        unmasked (its accesses vectorise) and the partial tile, if this run holds it, comes after."""
        lanes = tl.arange(0, BLOCK)
        whole = tl.minimum(stop, numel // BLOCK)
        tile = first
        # A while loop rather than `for tile in range(first, whole)`: the interpreter cannot turn its
        # runtime bounds into Python ints (numpy 2.4). The compiled loop is the same: same PTX body,
        # 58 registers on sm_90a either way.
        while tile < whole:
            start = tile * BLOCK
            # The gradient is read once and never again: evict_first keeps it from pushing the
            # state (read, then written back) and the caller's data out of L2.
            grad = tl.load(grad_pointer + start + lanes, eviction_policy="evict_first").to(tl.float32)
            states = state_pointer + start + lanes
            state = tl.load(states)
            scaled = grad * scale
            tl.store(states, decay * state + one_minus_decay * (scaled * scaled))
            tile += 1
        if stop > whole:
            offsets = whole * BLOCK + lanes
            inside = offsets < numel
            grad = tl.load(grad_pointer + offsets, mask=inside, other=0.0, eviction_policy="evict_first").to(tl.float32)
            state = tl.load(state_pointer + offsets, mask=inside, other=0.0)
            scaled = grad * scale
            tl.store(state_pointer + offsets, decay * state + one_minus_decay * (scaled * scaled), mask=inside)

    # The two counts vary from list to list: left unspecialised, a count that happens to be 1 or a
    # multiple of 16 does not compile a second kernel.
    @triton.jit(do_not_specialize=["tensor_count", "tile_count"])
    def _fisher_ema_kernel(
        table,  # int64 [5 T + 1 + programs], see _build_table
        tensor_count,  # T
        tile_count,  # tiles of BLOCK elements over the whole list, no tile straddling two tensors
        decay,
        one_minus_decay,  # formed in double on the host: 1 - float32(0.999) is 1.3e-5 off 0.001
        scale,
        BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes: lets the accesses vectorise
    ):
        """f = decay * f + (1 - decay) * (scale * g)^2 over a contiguous run of tiles of the list.

        One read of f and g and one write of f; the table costs a few scalar loads per tensor that the
        run touches (one or two for most programs), not per tile. Program p owns tiles
        [p * q + min(p, r), (p + 1) * q + min(p + 1, r)) with q, r = divmod(tile_count, programs), and
        table row 5 holds the tensor of its first tile. The dtype branch is uniform across a program.
        Multi-tensor apply as in NVIDIA Apex (csrc/multi_tensor_apply.cuh), on a persistent grid.

        Layout: 16-bit gradients are declared 8-byte aligned though they are 16: at 16 bytes Triton
        gives their loads 8 elements per thread while a float32 store takes at most 4, and converts
        every result between the two layouts through shared memory (a barrier per tile). At 8 bytes
        every access has 4 elements per thread: 16-byte ld/st.global.v4 for float32 and 8-byte v2 loads
        for 16-bit gradients, no shared memory (checked in the PTX for sm_80 and sm_90).
        """
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        share = tile_count // programs
        extra = tile_count % programs
        begin = (program * share + tl.minimum(program, extra)).to(tl.int64)
        end = begin + share + (program < extra).to(tl.int64)
        index = tl.load(table + 5 * tensor_count + 1 + program)
        while begin < end:
            tensor_first = tl.load(table + 4 * tensor_count + index)
            tensor_stop = tl.load(table + 4 * tensor_count + 1 + index)
            state_pointer = tl.load(table + index).to(tl.pointer_type(tl.float32))
            grad_address = tl.load(table + tensor_count + index)
            numel = tl.load(table + 2 * tensor_count + index)
            code = tl.load(table + 3 * tensor_count + index)
            stop = tl.minimum(end, tensor_stop)
            first = begin - tensor_first
            last = stop - tensor_first
            grad_f32 = grad_address.to(tl.pointer_type(tl.float32))
            grad_bf16 = grad_address.to(tl.pointer_type(tl.bfloat16))
            grad_f16 = grad_address.to(tl.pointer_type(tl.float16))
            if ALIGNED:
                state_pointer = tl.multiple_of(state_pointer, 16)
                grad_f32 = tl.multiple_of(grad_f32, 16)
                grad_bf16 = tl.multiple_of(grad_bf16, 8)
                grad_f16 = tl.multiple_of(grad_f16, 8)
            if code == _CODE_F32:
                _fisher_ema_tiles(state_pointer, grad_f32, first, last, numel, decay, one_minus_decay, scale, BLOCK)
            elif code == _CODE_BF16:
                _fisher_ema_tiles(state_pointer, grad_bf16, first, last, numel, decay, one_minus_decay, scale, BLOCK)
            else:
                _fisher_ema_tiles(state_pointer, grad_f16, first, last, numel, decay, one_minus_decay, scale, BLOCK)
            begin = stop
            index += 1

class _Table(NamedTuple):
    table: torch.Tensor  # on the device
    host: torch.Tensor  # its pinned source, kept alive with it
    programs: int
    tile_count: int
    aligned: bool


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _upload(values: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 tensor on `device` without a host sync: pinned host buffer + asynchronous copy."""
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.int64).pin_memory()
        return host.to(device, non_blocking=True), host
    host = torch.tensor(values, dtype=torch.int64, device=device)
    return host, host


def _build_table(work: "_Work", programs: Optional[int]) -> _Table:
    """Rows: state addresses, gradient addresses, element counts, gradient dtype codes (T each), the
    first global tile of each tensor and the tile count at the end (T + 1), the tensor that holds each
    program's first tile (one per program)."""
    numels = work.numels
    tile_starts = [0, *itertools.accumulate(-(-numel // _BLOCK) for numel in numels)]
    tile_count = tile_starts[-1]
    if programs is None:
        device = work.device
        programs = _PROGRAMS_PER_SM * _multiprocessors(device.index) if device.type == "cuda" else _INTERPRETER_PROGRAMS
    programs = max(1, min(programs, tile_count))
    share, extra = divmod(tile_count, programs)
    # Empty tensors own no tile: bisect_right passes over them to the tensor that holds the tile.
    first_tensor = [bisect.bisect_right(tile_starts, p * share + min(p, extra)) - 1 for p in range(programs)]
    values = [*work.state_addresses, *work.grad_addresses, *numels, *work.codes, *tile_starts, *first_tensor]
    table, host = _upload(values, work.device)
    aligned = all(address % 16 == 0 for address in itertools.chain(work.state_addresses, work.grad_addresses))
    return _Table(table, host, programs, tile_count, aligned)


def _fisher_ema_triton_launch(work: "_Work", decay: float, scale: float, *, programs: Optional[int] = None) -> None:
    """One launch for the whole list; `programs` overrides the grid size (tests of the persistent loop)."""
    # The tables live with the layout's verdict (_check_disjoint): a training loop that passes the same
    # tensors every step uploads its table once and pays one lookup per step for both.
    tables = work.tables if work.tables is not None else {}
    entry = tables.get((work.device, programs))
    if entry is None:
        entry = tables[(work.device, programs)] = _build_table(work, programs)
    device = work.device
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else contextlib.nullcontext():
        _fisher_ema_kernel[(entry.programs,)](entry.table, len(work.numels), entry.tile_count, decay, 1.0 - decay, scale,
                                               BLOCK=_BLOCK, ALIGNED=entry.aligned, num_warps=_NUM_WARPS)


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


_ELEMENT_BYTES = {code: dtype.itemsize for dtype, code in _GRAD_CODES.items()}
# Address layouts (_Work.layout) already found free of overlap, each with its dict of Triton tables
# by (device, programs) and, under "native", the C library's argument arrays: a training loop that
# passes the same tensors every step checks its list and builds its table once. A plain dict, oldest layout out first: a hit costs one hash of the layout
# (~3 us more than the duplicate-address set it replaces, for GPT-2 small's 148 pairs on the 2-core
# CI-class CPU), where moving the key to the end on every hit would hash it twice.
_LAYOUT_CACHE_SIZE = 16
_layouts: dict = {}


def _first_overlap(state_ranges: list, grad_ranges: list):
    """The first conflict among byte ranges [start, stop) (empty ranges left out): ("states", i, j)
    when states i and j overlap, ("grad", j, i) when gradient j overlaps state i, else None.
    Gradients may overlap one another: they are only read."""
    order = sorted((r for r in range(len(state_ranges)) if state_ranges[r][0] < state_ranges[r][1]),
                   key=lambda r: state_ranges[r][0])
    starts = [state_ranges[r][0] for r in order]
    for a, b in zip(order, order[1:]):
        if state_ranges[b][0] < state_ranges[a][1]:
            return "states", min(a, b), max(a, b)
    for j, (start, stop) in enumerate(grad_ranges):
        if start >= stop:
            continue
        # the state with the highest start below this gradient's stop is the only one that can overlap it
        at = bisect.bisect_left(starts, stop) - 1
        if at >= 0 and state_ranges[order[at]][1] > start:
            return "grad", j, order[at]
    return None


def _raise_overlap(op: str, fisher, grads) -> None:
    """Names the first overlap in the caller's indices (the error path: the lists are walked again)."""
    updated = [i for i, (state, grad) in enumerate(zip(fisher, grads)) if grad is not None and state.numel() != 0]
    state_ranges = [(fisher[i].data_ptr(), fisher[i].data_ptr() + fisher[i].numel() * fisher[i].element_size())
                    for i in updated]
    grad_ranges = [(grads[i].data_ptr(), grads[i].data_ptr() + grads[i].numel() * grads[i].element_size())
                   for i in updated if grads[i].is_contiguous()]
    grad_index = [i for i in updated if grads[i].is_contiguous()]
    conflict = _first_overlap(state_ranges, grad_ranges)
    if conflict is None:
        return
    kind, a, b = conflict
    name = f"aql_kernels.{op}"
    if kind == "states":
        i, j = updated[a], updated[b]
        if state_ranges[a] == state_ranges[b]:
            raise ValueError(f"{name}: the same fisher tensor appears twice in the list (fisher[{i}] and fisher[{j}], "
                             f"address {state_ranges[a][0]:#x})")
        raise ValueError(f"{name}: fisher[{i}] and fisher[{j}] overlap in memory; every fisher tensor must have memory of "
                         "its own")
    raise ValueError(f"{name}: grads[{grad_index[a]}] overlaps fisher[{updated[b]}] in memory; a gradient must not share "
                     "memory with a fisher tensor that the call updates")


def _check_disjoint(op: str, layout: tuple, fisher, grads) -> dict:
    """The states that get updated have memory of their own, and no gradient reads memory that one of
    them occupies (address ranges, not only equal addresses: views of one buffer, or buffers shared
    with numpy, overlap without being the same tensor). Elementwise, native, Triton and the reference
    would each read such memory at a different time, so their results would differ. Cached per
    address layout (_Work.layout): the common case is a dictionary lookup. Returns the layout's table
    cache."""
    tables = _layouts.get(layout)
    if tables is not None:
        return tables
    state_addresses, grad_addresses, numels, codes = layout
    state_ranges = [(address, address + 4 * numel) for address, numel in zip(state_addresses, numels)]
    grad_ranges = [(address, address + _ELEMENT_BYTES[code] * numel) for address, numel, code in zip(grad_addresses, numels, codes)]
    if _first_overlap(state_ranges, grad_ranges) is not None:
        _raise_overlap(op, fisher, grads)
        raise ValueError(f"aql_kernels.{op}: fisher tensors or gradients overlap in memory")  # (not reached)
    tables = _layouts[layout] = {}
    if len(_layouts) > _LAYOUT_CACHE_SIZE:
        del _layouts[next(iter(_layouts))]
    return tables


class _Work(NamedTuple):
    """The (state, gradient) pairs that have work: gradient not None, state not empty."""

    device: Optional[torch.device]  # None for an empty list
    states: list
    grads: list  # contiguous
    state_addresses: list
    grad_addresses: list
    numels: list
    codes: list  # _GRAD_CODES of the gradients
    plain: bool  # every tensor of the call is a torch.Tensor, not a subclass (fake, functional, ...)
    # (state addresses, gradient addresses, numels, codes) as tuples: the whole address layout of the
    # call, which keys the overlap verdicts and the device tables
    layout: tuple
    tables: Optional[dict] = None  # the layout's Triton tables by (device, programs), once it is checked


def _work(device, states, grads, state_addresses, grad_addresses, numels, codes, plain, check: Optional[tuple] = None) -> _Work:
    """The _Work of these pairs; check=(op, fisher, grads): after `_check_disjoint` on the caller's lists."""
    layout = (tuple(state_addresses), tuple(grad_addresses), tuple(numels), tuple(codes))
    tables = None if check is None else _check_disjoint(check[0], layout, check[1], check[2])
    return _Work(device, states, grads, state_addresses, grad_addresses, numels, codes, plain, layout, tables)


_TENSOR = torch.Tensor
_PLAIN = {torch.Tensor}
_FLOAT32_ONLY = {torch.float32}
_NONES = itertools.repeat(None)
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_is_cpu = operator.attrgetter("is_cpu")
_shape_of = operator.attrgetter("shape")


def _one_device(fisher, gradients) -> bool:
    """Whether every tensor is on fisher[0]'s device. CPU: one boolean attribute per tensor (~1.6 us for
    the 16 tensors of the MNIST-1D CNN's list against ~3.4 us for a set of torch.device objects)."""
    if fisher[0].is_cpu:
        return all(map(_is_cpu, fisher)) and all(map(_is_cpu, gradients))
    return len(set(map(_device_of, fisher)).union(map(_device_of, gradients))) == 1


def _collect(op: str, fisher, grads, decay, scale) -> _Work:
    """Validates the arguments (like `_validate`, and `_check_disjoint`) and returns the pairs that
    have work.

    A training loop calls this every step on a list of ~150 tensors, so the common case (plain
    contiguous tensors, float decay and scale, an address layout seen before) is checked with one
    C-level `map` per property over the whole list: ~0.13 ms for GPT-2 small's 148 pairs on the 2-core
    CI-class CPU, where a validating walk, a second walk for the pairs and a third for the addresses
    took ~0.23 ms. Anything else takes `_validate`, which names the first bad argument, and the
    general walk.
    """
    if (type(fisher) in (list, tuple) and type(grads) in (list, tuple) and len(fisher) == len(grads) and len(fisher) > 0
            and type(decay) is float and 0.0 <= decay < 1.0 and type(scale) is float and abs(scale) <= _FLOAT32_MAX):
        states, gradients = fisher, grads
        if any(map(operator.is_, grads, _NONES)):
            states = [state for state, grad in zip(fisher, grads) if grad is not None]
            gradients = [grad for grad in grads if grad is not None]
        if set(map(type, fisher)) == _PLAIN and set(map(type, gradients)) <= _PLAIN:
            codes = list(map(_GRAD_CODES.get, map(_dtype_of, gradients)))
            numels = list(map(_TENSOR.numel, states))
            if (None not in codes and 0 not in numels and set(map(_dtype_of, fisher)) == _FLOAT32_ONLY
                    and _one_device(fisher, gradients)
                    and all(map(_TENSOR.is_contiguous, fisher)) and all(map(_TENSOR.is_contiguous, gradients))
                    and list(map(_shape_of, states)) == list(map(_shape_of, gradients))):
                return _work(fisher[0].device, states, gradients, list(map(_TENSOR.data_ptr, states)),
                             list(map(_TENSOR.data_ptr, gradients)), numels, codes, True, check=(op, fisher, grads))
    _validate(op, fisher, grads, decay, scale)
    # A non-contiguous gradient is copied to a contiguous one (one extra pass over that tensor).
    pairs = [(state, grad if grad.is_contiguous() else grad.contiguous())
             for state, grad in zip(fisher, grads) if grad is not None and state.numel() != 0]
    states = [state for state, _ in pairs]
    gradients = [grad for _, grad in pairs]
    plain = all(type(t) is _TENSOR for t in itertools.chain(fisher, grads) if t is not None)
    # (fake and functional tensors have no memory to compare)
    return _work(fisher[0].device if len(fisher) else None, states, gradients, [s.data_ptr() for s in states],
                 [g.data_ptr() for g in gradients], [s.numel() for s in states], [_GRAD_CODES[g.dtype] for g in gradients],
                 plain, check=(op, fisher, grads) if plain else None)


# ---------------------------------------------------------------------------------------------------
# The three implementations (each validates like the public function)
# ---------------------------------------------------------------------------------------------------
def fisher_ema_reference(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """The spec, with torch's foreach ops (two passes over the state)."""
    _collect("fisher_ema_reference", fisher, grads, decay, scale)  # the same checks as the kernels
    pairs = [(f, g) for f, g in zip(fisher, grads) if g is not None]
    if not pairs:
        return
    states = [f for f, _ in pairs]
    scaled = torch._foreach_mul([g.float() for _, g in pairs], float(scale))
    torch._foreach_mul_(states, float(decay))
    torch._foreach_addcmul_(states, scaled, scaled, value=1.0 - float(decay))


def _native_arguments(work: _Work) -> tuple:
    """The C call's count and arrays (addresses, dtype codes, element counts) of the work list."""
    count = len(work.numels)
    return (count, (ctypes.c_void_p * count)(*work.state_addresses), (ctypes.c_void_p * count)(*work.grad_addresses),
            (ctypes.c_int32 * count)(*work.codes), (ctypes.c_int64 * count)(*work.numels))


def _fisher_ema_native_run(work: _Work, decay: float, scale: float) -> None:
    if work.device.type != "cpu":
        raise ValueError(f"aql_kernels.{_OP}: the native implementation runs on CPU tensors, got {work.device}")
    # Kept with the layout's verdict: the four ctypes arrays cost ~3.5 us to build for the 8 tensors of
    # the MNIST-1D CNN (2-core CI-class CPU), more than the kernel's own time on that list.
    tables = work.tables
    arguments = None if tables is None else tables.get("native")
    if arguments is None:
        arguments = _native_arguments(work)
        if tables is not None:
            tables["native"] = arguments
    _native.CPU.call("aql_fisher_ema", *arguments, decay, scale)


def _fisher_ema_triton_run(work: _Work, decay: float, scale: float) -> None:
    if triton is None:
        raise RuntimeError(f"aql_kernels.{_OP}: the Triton implementation needs triton, which does not import here")
    _fisher_ema_triton_launch(work, decay, scale)


def _fisher_ema_reference_run(work: _Work, decay: float, scale: float) -> None:
    states, grads = work.states, work.grads
    scaled = torch._foreach_mul([g.float() for g in grads], scale)
    torch._foreach_mul_(states, decay)
    torch._foreach_addcmul_(states, scaled, scaled, value=1.0 - decay)


def _fisher_ema_native(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """C++ / OpenMP implementation (CPU tensors)."""
    work = _collect(_OP, fisher, grads, decay, scale)
    if work.numels:
        _fisher_ema_native_run(work, float(decay), float(scale))


def _fisher_ema_triton(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """Triton implementation: one launch for the whole list (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    work = _collect(_OP, fisher, grads, decay, scale)
    if work.numels:
        _fisher_ema_triton_run(work, float(decay), float(scale))


_RUNNERS = {
    "reference": _fisher_ema_reference_run,
    "native": _fisher_ema_native_run,
    "triton": _fisher_ema_triton_run,
}


# ---------------------------------------------------------------------------------------------------
# torch.library op and the public function
# ---------------------------------------------------------------------------------------------------
def _run(work: _Work, decay: float, scale: float) -> None:
    if work.numels:
        _RUNNERS[_dispatch.choose(_OP, work.device, native_symbol="aql_fisher_ema")](work, decay, scale)


@torch.library.custom_op("aql::fisher_ema_", mutates_args=("fisher",))
def _fisher_ema_op(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, scale: float) -> None:
    _run(_collect(_OP, fisher, grads, decay, scale), decay, scale)


@_fisher_ema_op.register_fake
def _fisher_ema_fake(fisher, grads, decay, scale) -> None:
    return None


# The C++ eager route (aql_kernels._C, csrc/torch/extension.cpp) for CPU lists: one C++ loop checks both
# lists and calls the kernel (the 8 tensors of the MNIST-1D CNN: ~28 -> ~6 us, against ~22 us for
# torch._foreach_mul_ + _foreach_addcmul_; one thread of the 2-core EPYC CI machine, fresh gradient
# tensors every call as zero_grad(set_to_none=True) leaves them). It returns False, having changed
# nothing, for what it does not cover (then the Python route below validates and runs). None until
# first looked up, then the module or False where it is unavailable (backends()["cpu_extension"]).
_extension_module = None


def _extension():
    global _extension_module
    if _extension_module is None:
        _extension_module = _native.EXTENSION.module() or False
    return _extension_module or None


def fisher_ema_(fisher: list[torch.Tensor], grads: list[Optional[torch.Tensor]], decay: float, *, scale: float = 1.0) -> None:
    """In place, for every i with grads[i] not None:
    fisher[i] = decay * fisher[i] + (1 - decay) * (scale * grads[i]) ** 2.

    fisher: float32 contiguous tensors, all on one device, no two sharing memory; grads: float32 /
    bfloat16 / float16 tensors (or None) of the same shapes on the same device, none sharing memory
    with a fisher tensor (a non-contiguous gradient is copied first); 0 <= decay < 1; scale finite
    (e.g. 1 / loss_scale for scaled gradients, or the batch size to turn the gradient of a mean loss
    into that of a sum). One kernel launch for the whole list on CUDA; no host synchronisation.
    """
    if torch.compiler.is_compiling():
        _validate(_OP, fisher, grads, decay, scale)
        torch.ops.aql.fisher_ema_.default(list(fisher), list(grads), float(decay), float(scale))
        return
    extension = _extension_module if _extension_module is not None else _extension()
    if (extension and type(fisher) in (list, tuple) and type(grads) in (list, tuple) and len(fisher) > 0 and len(grads) > 0
            and _dispatch.eager(fisher[0], grads[0]) and extension.fisher_ema(fisher, grads, decay, scale)):
        return
    work = _collect(_OP, fisher, grads, decay, scale)
    # Eager call on plain tensors: the op's own implementation, without the round trip of two 148-tensor
    # lists through the dispatcher and the custom op's Python wrapper (GPT-2 small's list on the 2-core
    # CI-class CPU, kernel left out: ~0.15 ms this way, ~0.3 ms through torch.ops.aql.fisher_ema_) and
    # a second `_collect`. (The torch.func check looks at the first pair: a transform wraps every
    # tensor it is given.)
    if work.plain and _dispatch.eager(*work.states[:1], *work.grads[:1]):
        _run(work, float(decay), float(scale))
    else:
        torch.ops.aql.fisher_ema_.default(list(fisher), list(grads), float(decay), float(scale))


IMPLEMENTATIONS = {
    "reference": fisher_ema_reference,
    "native": _fisher_ema_native,
    "triton": _fisher_ema_triton,
}
