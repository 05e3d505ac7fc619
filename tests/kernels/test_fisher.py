"""fisher_ema_: every implementation against a float64 reference, adversarial values, the torch.library
registration, and bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import aql_kernels
from aql_kernels import fisher as fisher_module
from aql_kernels._native import CPU
from tests.conftest import implementation_device, requires_cuda, triton_device

IMPLEMENTATIONS = sorted(fisher_module.IMPLEMENTATIONS)
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes: a single element, a partial vector, just under a power of two, just over one Triton
# block count and one OpenMP slice boundary, and 2-D tensors.
SHAPES = [(1,), (3,), (1023,), (2**20 + 1,), (7, 13), (64, 33)]


def _device_for(name: str) -> str:
    if name == "native" and not CPU.has("aql_fisher_ema"):
        pytest.skip(f"the CPU library is not built here ({CPU.reason or 'no aql_fisher_ema'}); `make native` builds it")
    return implementation_device(name)


def _expected(fisher, grads, decay, scale):
    """Independent float64 spec: a plain loop, no foreach."""
    out = []
    for state, grad in zip(fisher, grads):
        state64 = state.detach().cpu().double()
        if grad is None:
            out.append(state64)
        else:
            scaled = scale * grad.detach().cpu().double()
            out.append(decay * state64 + (1.0 - decay) * scaled * scaled)
    return out


def _assert_matches(fisher, expected):
    for i, (actual, wanted) in enumerate(zip(fisher, expected)):
        # float32 arithmetic on exactly converted inputs: a few ulps of the result, and inf where the
        # float32 result overflows.
        torch.testing.assert_close(actual.cpu().double(), wanted.float().double(), rtol=4e-6, atol=1e-30, equal_nan=True,
                                   msg=lambda m, i=i: f"fisher[{i}] shape {tuple(actual.shape)}: {m}")


def _make(shapes, grad_dtype, device, none_at=()):
    fisher = [torch.rand(shape, device=device) * 3 for shape in shapes]
    grads = [None if i in none_at else (torch.randn(shape, device=device) * 2).to(grad_dtype) for i, shape in enumerate(shapes)]
    return fisher, grads


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("decay, scale", [(0.0, 1.0), (0.999, 1.0), (0.95, 0.37), (0.5, 1024.0)])
def test_matches_float64_reference(name, grad_dtype, decay, scale):
    device = _device_for(name)
    fisher, grads = _make(SHAPES, grad_dtype, device, none_at=(1, 4))
    untouched = [fisher[1].clone(), fisher[4].clone()]
    expected = _expected(fisher, grads, decay, scale)
    fisher_module.IMPLEMENTATIONS[name](fisher, grads, decay, scale=scale)
    _assert_matches(fisher, expected)
    # None gradients leave their state bit-identical.
    assert torch.equal(fisher[1], untouched[0]) and torch.equal(fisher[4], untouched[1])


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_mixed_dtypes_many_tiny_and_one_huge(name):
    """One list mixing every gradient dtype, 200 tiny tensors around a large one (work balance)."""
    device = _device_for(name)
    shapes = [(int(n),) for n in torch.randint(1, 40, (200,))]
    shapes.insert(97, (300_007,))
    fisher = [torch.rand(shape, device=device) for shape in shapes]
    grads = [torch.randn(shape, device=device).to(GRAD_DTYPES[i % 3]) if i % 7 else None for i, shape in enumerate(shapes)]
    expected = _expected(fisher, grads, 0.9, 3.0)
    fisher_module.IMPLEMENTATIONS[name](fisher, grads, 0.9, scale=3.0)
    _assert_matches(fisher, expected)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
def test_adversarial_values(name, grad_dtype):
    device = _device_for(name)
    info = torch.finfo(grad_dtype)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, info.max, -info.max, info.tiny,
                            info.tiny / 4, -info.tiny / 8, info.eps, 1.0], dtype=torch.float32)
    # Long enough for the vector paths and their scalar tails, with the special values spread over both.
    grad = torch.randn(1000)
    grad[torch.randperm(1000)[: special.numel() * 4]] = special.repeat(4)
    grad = grad.to(grad_dtype).to(device)
    state = torch.rand(1000, device=device)
    state[::50] = float("inf")
    state[1::50] = 0.0
    fisher, grads = [state], [grad]
    for scale in (1.0, 1e-3):
        expected = _expected(fisher, grads, 0.75, scale)
        fisher_module.IMPLEMENTATIONS[name](fisher, grads, 0.75, scale=scale)
        _assert_matches(fisher, expected)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_scale_is_applied_before_squaring(name):
    """(scale * g)^2 stays finite where g^2 alone overflows float32."""
    device = _device_for(name)
    fisher = [torch.zeros(5, device=device)]
    grads = [torch.full((5,), 1e30, device=device)]
    fisher_module.IMPLEMENTATIONS[name](fisher, grads, 0.5, scale=1e-20)
    torch.testing.assert_close(fisher[0].cpu(), torch.full((5,), 0.5e20), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_non_contiguous_grads_and_unaligned_tensors(name):
    device = _device_for(name)
    buffer = torch.rand(4 * 1024 + 3, device=device)
    fisher = [buffer[1:1 + 33 * 17].view(33, 17), buffer[700:700 + 5], torch.rand(17, 33, device=device)]
    grads = [torch.randn(17, 33, device=device).t(), torch.randn(10, device=device)[::2], torch.randn(33, 17, device=device).t()]
    assert not grads[0].is_contiguous() and fisher[0].data_ptr() % 16 != 0
    expected = _expected(fisher, grads, 0.8, 1.5)
    fisher_module.IMPLEMENTATIONS[name](fisher, grads, 0.8, scale=1.5)
    _assert_matches(fisher, expected)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_repeated_updates_and_new_tensors_of_the_same_shapes(name):
    """The Triton tables are cached by address: new tensors of the same shapes must not reuse stale ones."""
    device = _device_for(name)
    first = _make([(5,), (4099,)], torch.float32, device)
    second = _make([(5,), (4099,)], torch.bfloat16, device)
    expected_first = [s.cpu().double() for s in first[0]]
    expected_second = [s.cpu().double() for s in second[0]]
    for step in range(3):
        for (fisher, grads), expected in ((first, expected_first), (second, expected_second)):
            expected[:] = [0.9 * e + 0.1 * g.cpu().double() ** 2 for e, g in zip(expected, grads)]
            fisher_module.IMPLEMENTATIONS[name](fisher, grads, 0.9)
            grads[:] = [(torch.randn_like(g.float()) * (step + 1)).to(g.dtype) for g in grads]
    _assert_matches(first[0], expected_first)
    _assert_matches(second[0], expected_second)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_empty_lists_all_none_and_empty_tensors(name):
    device = _device_for(name)
    fisher_module.IMPLEMENTATIONS[name]([], [], 0.5)
    fisher = [torch.rand(4, device=device), torch.rand(0, device=device)]
    before = fisher[0].clone()
    fisher_module.IMPLEMENTATIONS[name](fisher, [None, None], 0.5)
    assert torch.equal(fisher[0], before)
    fisher_module.IMPLEMENTATIONS[name](fisher, [None, torch.randn(0, device=device)], 0.5)
    assert torch.equal(fisher[0], before)


def test_public_function_dispatches_and_matches():
    fisher, grads = _make([(3,), (2**20 + 1,), (7, 13)], torch.bfloat16, "cpu", none_at=(0,))
    expected = _expected(fisher, grads, 0.95, 2.0)
    aql_kernels.fisher_ema_(fisher, grads, 0.95, scale=2.0)
    _assert_matches(fisher, expected)


def test_opcheck():
    fisher, grads = _make([(5,), (3, 4), (2,)], torch.float32, "cpu", none_at=(2,))
    torch.library.opcheck(torch.ops.aql.fisher_ema_.default, (fisher, grads, 0.9, 2.0))
    fisher, grads = _make([(5,), (3, 4)], torch.float16, "cpu")
    torch.library.opcheck(torch.ops.aql.fisher_ema_.default, (fisher, grads, 0.0, 1.0))


def test_torch_compile_fullgraph():
    fisher, grads = _make([(5,), (3, 4), (129,)], torch.float32, "cpu", none_at=(1,))
    eager = [f.clone() for f in fisher]
    aql_kernels.fisher_ema_(eager, grads, 0.9, scale=0.5)

    @torch.compile(fullgraph=True)
    def step(states, gradients):
        aql_kernels.fisher_ema_(states, gradients, 0.9, scale=0.5)

    step(fisher, grads)
    for actual, wanted in zip(fisher, eager):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=0.0)


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from aql_kernels import fisher
signature = {"table": "*i64", "tensor_count": "i32", "tile_count": "i32", "decay": "fp32", "one_minus_decay": "fp32",
             "scale": "fp32", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
out = {}
for arch in (80, 90):
    for aligned in (True, False):
        source = ASTSource(fn=fisher._fisher_ema_kernel, signature=signature, constexprs={"BLOCK": fisher._BLOCK, "ALIGNED": aligned})
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": fisher._NUM_WARPS})
        out[f"{arch}-{aligned}"] = {"ptx": kernel.asm["ptx"], "ttgir": kernel.asm["ttgir"], "shared": kernel.metadata.shared}
json.dump(out, sys.stdout)
"""


@functools.lru_cache(maxsize=None)
def _compiled_for_the_gpu() -> dict:
    """The kernel compiled ahead of time for sm_80 and sm_90 (no device needed; in a fresh process,
    since TRITON_INTERPRET=1 replaces @triton.jit): {"<arch>-<aligned>": {"ptx", "ttgir", "shared"}}."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr:
        pytest.skip(f"triton cannot assemble for the GPU here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_triton_kernel_compiles_for_the_gpu_without_a_shared_memory_round_trip():
    """The interpreter does not run the compiler: this compiles the kernel for the GPU and checks that
    no result goes between layouts through shared memory (a barrier per tile)."""
    compiled = _compiled_for_the_gpu()
    for arch in (80, 90):
        for aligned in (True, False):
            variant = compiled[f"{arch}-{aligned}"]
            assert variant["shared"] == 0 and "convert_layout" not in variant["ttgir"] and "bar.sync" not in variant["ptx"]


@pytest.mark.codegen
def test_triton_kernel_vectorises():
    """Exact counts of the hot loop's vector accesses in the PTX of the Triton version the kernel was
    tuned with (3.6): 16-byte loads and stores of float32, 8-byte loads of 16-bit gradients. Another
    Triton version may emit the same work differently, so this runs only with `-m codegen`."""
    import re

    compiled = _compiled_for_the_gpu()

    def count(pattern, ptx):
        return len(re.findall(pattern, ptx))

    for arch in (80, 90):
        aligned, unaligned = compiled[f"{arch}-True"], compiled[f"{arch}-False"]
        ptx = aligned["ptx"]
        # Per thread and tile, groups of 4 elements (4 with the shipped BLOCK and warps): one 16-byte
        # state load and store each in every one of the 3 dtype branches, one 16-byte float32 gradient
        # load (evict_first) and one 8-byte load per 16-bit gradient dtype.
        groups = fisher_module._BLOCK // (32 * fisher_module._NUM_WARPS * 4)
        assert count(r"ld\.global\.v4\.b32", ptx) == 3 * groups
        assert count(r"st\.global\.v4\.b32", ptx) == 3 * groups
        assert count(r"ld\.global\.L1::evict_first[.A-Za-z0-9:_]*\.v4\.b32", ptx) == groups
        assert count(r"ld\.global\.L1::evict_first[.A-Za-z0-9:_]*\.v2\.b32", ptx) == 2 * groups
        # Unaligned tensors: element-wise accesses, still correct.
        assert count(r"(ld|st)\.global[.A-Za-z0-9:_]*\.v[24]\.", unaligned["ptx"]) == 0


@requires_cuda
def test_cuda_one_launch_without_host_sync():
    fisher, grads = _make([(5,), (2**20 + 1,), (7, 13), (3,)], torch.bfloat16, "cuda", none_at=(3,))
    aql_kernels.fisher_ema_(fisher, grads, 0.9)  # builds and uploads the tables
    expected = _expected(fisher, grads, 0.9, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aql_kernels.fisher_ema_(fisher, grads, 0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_matches(fisher, expected)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        aql_kernels.fisher_ema_(fisher, grads, 0.9)
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA and "fisher" in e.name]
    assert len(kernels) == 1, [e.name for e in kernels]


# ---- the persistent grid ---------------------------------------------------------------------------
# Tiles of BLOCK elements, an empty tensor, partial last tiles, a tensor of exactly one tile and one
# that spans several programs' runs.
_BLOCK = fisher_module._BLOCK
PERSISTENT_SHAPES = [(3 * _BLOCK + 5,), (0,), (17,), (_BLOCK,), (2, _BLOCK + 1), (5,), (4 * _BLOCK - 1,), (0, 3), (1,)]


@pytest.mark.parametrize("programs", [1, 3, 4, 5, 13, 64])
def test_persistent_loop_more_tiles_than_programs(programs):
    """Every program walks several tiles and tensors; every tile must be updated exactly once (decay
    0.5 makes a tile done twice or skipped show). The list has 14 tiles: 3, 4, 5 and 13 programs leave
    a remainder that some programs take one extra tile of; 64 programs are cut down to 14."""
    device = triton_device()
    grad_dtypes = [GRAD_DTYPES[i % 3] for i in range(len(PERSISTENT_SHAPES))]
    fisher = [torch.rand(shape, device=device) * 3 for shape in PERSISTENT_SHAPES]
    grads = [None if i == 5 else (torch.randn(shape, device=device) * 2).to(dtype)
             for i, (shape, dtype) in enumerate(zip(PERSISTENT_SHAPES, grad_dtypes))]
    expected = _expected(fisher, grads, 0.5, 0.75)
    work = fisher_module._collect("fisher_ema_", fisher, grads, 0.5, 0.75)
    fisher_module._fisher_ema_triton_launch(work, 0.5, 0.75, programs=programs)
    _assert_matches(fisher, expected)


def _walk(table: list[int], tensor_count: int, tile_count: int, programs: int) -> list[tuple[int, int]]:
    """The kernel's walk over its table, in plain Python: the (tensor, local tile) pairs each program visits."""
    visits = []
    share, extra = divmod(tile_count, programs)
    starts = table[4 * tensor_count: 5 * tensor_count + 1]
    for program in range(programs):
        begin = program * share + min(program, extra)
        end = begin + share + (program < extra)
        index = table[5 * tensor_count + 1 + program]
        while begin < end:
            stop = min(end, starts[index + 1])
            visits += [(index, tile - starts[index]) for tile in range(begin, stop)]
            begin = stop
            index += 1
    return visits


@pytest.mark.parametrize("trial", range(4))
def test_table_partitions_the_tiles(trial):
    """Host side only (no kernel): for random lists with empty tensors and any program count, the
    table makes the programs visit each tile of each tensor exactly once."""
    for _ in range(50):
        count = int(torch.randint(1, 12, ()))
        numels = [int(n) for n in torch.randint(0, 4 * _BLOCK, (count,))]
        numels = [0 if torch.rand(()) < 0.2 else n for n in numels]
        if not any(numels):
            numels[0] = 1
        work = fisher_module._work(torch.device("cpu"), [], [], [16 * (i + 1) for i in range(count)], [16 * (i + 100) for i in range(count)],
                                   numels, [0] * count, True)
        programs = int(torch.randint(1, 40, ()))
        built = fisher_module._build_table(work, programs)
        tiles = [-(-n // _BLOCK) for n in numels]
        assert built.tile_count == sum(tiles) and built.programs == min(programs, sum(tiles))
        visits = _walk(built.table.tolist(), count, built.tile_count, built.programs)
        assert sorted(visits) == [(t, j) for t in range(count) for j in range(tiles[t])]


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_list_forms_and_integer_scalars(name):
    """Tuples, integer decay / scale, None gradients and empty tensors that share an address (the
    general path of the argument walk) give the same result as the common case."""
    device = _device_for(name)
    fisher, grads = _make([(5,), (3, 4), (2,), (6,)], torch.float32, device, none_at=(2,))
    empties = [torch.empty(0, device=device), torch.empty(0, device=device)]
    fisher += empties
    grads += [torch.empty(0, device=device), torch.empty(0, device=device)]
    expected = _expected(fisher, grads, 0.0, 2.0)
    fisher_module.IMPLEMENTATIONS[name](tuple(fisher), tuple(grads), 0, scale=2)
    _assert_matches(fisher, expected)


def test_public_function_goes_through_the_op_under_a_dispatch_mode():
    """Eager calls on plain tensors run the implementation directly; under a Python dispatch mode the
    registered op must be visible (and give the same result)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    fisher, grads = _make([(5,), (3, 4)], torch.bfloat16, "cpu")
    direct = [f.clone() for f in fisher]
    expected = _expected(fisher, grads, 0.9, 1.5)
    aql_kernels.fisher_ema_(direct, grads, 0.9, scale=1.5)
    with Record() as mode:
        aql_kernels.fisher_ema_(fisher, grads, 0.9, scale=1.5)
    assert "aql.fisher_ema_.default" in mode.ops
    _assert_matches(fisher, expected)
    _assert_matches(direct, expected)


# ---- bad input ------------------------------------------------------------------------------------
def _ok():
    return [torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3), None]


@pytest.mark.parametrize("function", [aql_kernels.fisher_ema_, *fisher_module.IMPLEMENTATIONS.values()])
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda f, g: (f[0], g), TypeError, r"fisher must be a list of tensors, got Tensor"),
        (lambda f, g: (f, g[0]), TypeError, r"grads must be a list of tensors or None, got Tensor"),
        (lambda f, g: (f, g + [None]), ValueError, r"same length, got 2 and 3"),
        (lambda f, g: (f, [torch.ones(4), None]), ValueError, r"grads\[0\] must have the shape of fisher\[0\] \(3,\), got \(4,\)"),
        (lambda f, g: ([f[0].double(), f[1]], g), TypeError, r"fisher\[0\] must be float32, got torch.float64"),
        (lambda f, g: ([f[0], torch.zeros(2, 2).t()], [g[0], torch.ones(2, 2)]), ValueError, r"fisher\[1\] must be contiguous"),
        (lambda f, g: (f, [torch.ones(3, dtype=torch.int32), None]), TypeError,
         r"grads\[0\] must have dtype in \(float32, bfloat16, float16\), got torch.int32"),
        (lambda f, g: (f, ["x", None]), TypeError, r"grads\[0\] must be a torch.Tensor or None, got str"),
        (lambda f, g: ([f[0], "x"], g), TypeError, r"fisher\[1\] must be a torch.Tensor, got str"),
        (lambda f, g: ([f[0], torch.zeros(2, 2, device="meta")], g), ValueError, r"fisher\[1\] must be on cpu \(like fisher\[0\]\), got meta"),
        (lambda f, g: (f, [torch.ones(3, device="meta"), None]), ValueError, r"grads\[0\] must be on cpu \(like fisher\[0\]\), got meta"),
    ],
)
def test_bad_lists(function, mutate, error, match):
    fisher, grads = mutate(*_ok())
    with pytest.raises(error, match=match):
        function(fisher, grads, 0.9)


@pytest.mark.parametrize("function", [aql_kernels.fisher_ema_, *fisher_module.IMPLEMENTATIONS.values()])
@pytest.mark.parametrize(
    "decay, scale, error, match",
    [
        (1.0, 1.0, ValueError, r"decay must be in \[0, 1\), got 1.0"),
        (-0.1, 1.0, ValueError, r"decay must be in \[0, 1\), got -0.1"),
        (float("nan"), 1.0, ValueError, r"decay must be in \[0, 1\), got nan"),
        ("0.9", 1.0, TypeError, r"decay must be a float, got str '0.9'"),
        (0.9, float("inf"), ValueError, r"scale must be finite in float32 \(\|scale\| <= 3.403e\+38\), got inf"),
        (0.9, None, TypeError, r"scale must be a float, got NoneType"),
        (0.9, 1e39, ValueError, r"scale must be finite in float32"),
    ],
)
def test_bad_scalars(function, decay, scale, error, match):
    fisher, grads = _ok()
    with pytest.raises(error, match=r"aql_kernels\.fisher_ema_\w*: " + match):
        function(fisher, grads, decay, scale=scale)


def _function_and_device(name):
    if name == "public":
        return aql_kernels.fisher_ema_, "cpu"
    return fisher_module.IMPLEMENTATIONS[name], _device_for(name)


@pytest.mark.parametrize("name", ["public", *IMPLEMENTATIONS])
def test_same_state_twice_is_rejected(name):
    function, device = _function_and_device(name)
    state = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"the same fisher tensor appears twice"):
        function([state, state], [torch.ones(4, device=device), torch.ones(4, device=device)], 0.5)
    assert torch.equal(state.cpu(), torch.zeros(4))


def _overlaps(device):
    """(fisher, grads, message) triples of lists whose memory overlaps in a way the op refuses."""
    buffer = torch.rand(10, device=device)
    other = torch.rand(6, device=device)
    cases = [
        # two views of one buffer, partly overlapping (not the same address)
        ([buffer[0:6], buffer[4:10]], [torch.ones(6, device=device), torch.ones(6, device=device)],
         r"fisher\[0\] and fisher\[1\] overlap in memory"),
        # a gradient that is its own fisher tensor
        ([other, buffer[:3]], [other, torch.ones(3, device=device)], r"grads\[0\] overlaps fisher\[0\] in memory"),
        # a gradient reading part of another (updated) fisher tensor, in bfloat16
        ([buffer[:4], other], [torch.ones(4, device=device), buffer.view(torch.bfloat16)[2:8]],
         r"grads\[1\] overlaps fisher\[0\] in memory"),
    ]
    if device == "cpu":
        # two storages over one numpy buffer: different tensors, different storages, shared memory
        array = np.random.rand(8).astype(np.float32)
        cases.append(([torch.from_numpy(array[0:5]), torch.from_numpy(array[3:8])], [torch.ones(5), torch.ones(5)],
                      r"fisher\[0\] and fisher\[1\] overlap in memory"))
    return cases


@pytest.mark.parametrize("name", ["public", *IMPLEMENTATIONS])
def test_overlapping_memory_is_rejected(name):
    """The implementations read and write such memory in different orders, so they would disagree:
    refused before any work, whatever the implementation, with the index of each party."""
    function, device = _function_and_device(name)
    for fisher, grads, match in _overlaps(device):
        before = [f.clone() for f in fisher]
        with pytest.raises(ValueError, match=rf"aql_kernels\.fisher_ema_\w*: {match}"):
            function(fisher, grads, 0.5)
        for f, b in zip(fisher, before):
            assert torch.equal(f, b)


@pytest.mark.parametrize("name", ["public", *IMPLEMENTATIONS])
def test_disjoint_views_of_one_buffer_are_fine(name):
    """Fisher tensors that are adjacent views of one flat buffer (a common layout), with gradients
    that overlap one another (only read), update as separate tensors; a repeated call hits the
    verdict cache and gives the same answer."""
    function, device = _function_and_device(name)
    flat = torch.rand(3 + 7 * 5 + 64, device=device)
    fisher = [flat[:3], flat[3:38].view(7, 5), flat[38:]]
    grad_buffer = torch.randn(70, device=device)
    grads = [grad_buffer[:3], grad_buffer[1:36].view(7, 5), grad_buffer[6:70]]
    for _ in range(2):
        expected = _expected(fisher, grads, 0.8, 1.5)
        function(fisher, grads, 0.8, scale=1.5)
        _assert_matches(fisher, expected)


@pytest.mark.skipif(not CPU.has("aql_fisher_ema"), reason="the CPU library is not built here")
def test_native_library_checks_its_arguments():
    import ctypes

    from aql_kernels._native import NativeError

    state = torch.zeros(4)
    grad = torch.ones(4)
    states = (ctypes.c_void_p * 1)(state.data_ptr())
    grads = (ctypes.c_void_p * 1)(grad.data_ptr())
    numels = (ctypes.c_int64 * 1)(4)
    with pytest.raises(NativeError, match=r"grad_dtypes\[0\] must be 0 \(f32\), 1 \(bf16\) or 2 \(f16\), got 7"):
        CPU.call("aql_fisher_ema", 1, states, grads, (ctypes.c_int32 * 1)(7), numels, 0.5, 1.0)
    with pytest.raises(NativeError, match=r"decay must be in \[0, 1\), got 1"):
        CPU.call("aql_fisher_ema", 1, states, grads, (ctypes.c_int32 * 1)(0), numels, 1.0, 1.0)
    assert torch.equal(state, torch.zeros(4))

