"""How close the CPU kernels get to this machine's read bandwidth (a script, not a pytest suite).

For each thread count (a child process per count, OMP_NUM_THREADS set before torch and the library
load), the cases below are timed in turn, interleaved repeat by repeat, and the median of the
repeats is reported with the GB/s of the bytes the op must read (wall clock), and beside it the
median process CPU time, steadier than the wall clock on a shared machine (`cpu of sum`: x.sum()'s
CPU time over the op's, for one thread the read-bandwidth fraction measured in CPU time):

  sum_1e7            x.sum() over the 10^7 float32 scores: the read bandwidth at that size (40 MB)
  topk_mask_1e7      aql_kernels.topk_mask(x, k = 0.2 N), the bool mask included in the time;
                     GB/s counts the 40 MB of scores only (the 10 MB mask write is extra traffic)
  sum_scores         logits.sum() over the 4096 x 32000 float32 logits (524 MB)
  softmax_scores     aql_kernels.softmax_scores(logits, targets): all seven statistics
  compiled_composite torch.compile of the eager composite of benchmarks/bench_scores.py (--compile)

`--baseline-lib DIR` also times the same C entry points of another build of libaql_cpu.so (say, the
one before a change), called directly through ctypes with the same outputs, in the same interleaved
loop: before and after side by side on the same noisy machine.

    python benchmarks/bench_cpu_bandwidth.py --threads 1 2 --repeats 7
    python benchmarks/bench_cpu_bandwidth.py --baseline-lib /tmp/aql_before --compile
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_SELECT = 10**7
FRACTION = 0.2
SCORES_SHAPE = (4096, 32000)
IGNORE = -100


def _load_baseline(directory: str):
    """The C entry points of another libaql_cpu.so, with the argument types of _native._SIGNATURES."""
    from aql_kernels import _native

    library = ctypes.CDLL(str(Path(directory) / "libaql_cpu.so"))
    for name in ("aql_topk_select", "aql_softmax_scores"):
        restype, argtypes = _native._SIGNATURES[name]
        getattr(library, name).restype = restype
        getattr(library, name).argtypes = argtypes
    return library


def _baseline_cases(library, scores, k, logits, targets):
    import torch

    from aql_kernels._native import pointer

    def topk_mask():
        mask = torch.empty(scores.shape[0], dtype=torch.bool)
        status = library.aql_topk_select(pointer(scores), scores.shape[0], k, pointer(mask), None, None)
        if status != 0:
            raise RuntimeError(f"baseline aql_topk_select failed with status {status}")
        return mask

    def softmax_scores():
        n, v = logits.shape
        floats = [torch.empty(n) for _ in range(6)]
        argmax = torch.empty(n, dtype=torch.int64)
        lse, entropy, maxprob, margin, loss, el2n = floats
        status = library.aql_softmax_scores(pointer(logits), 0, n, v, v, pointer(targets), IGNORE, pointer(lse), pointer(entropy),
                                            pointer(maxprob), pointer(margin), pointer(argmax), pointer(loss), pointer(el2n))
        if status != 0:
            raise RuntimeError(f"baseline aql_softmax_scores failed with status {status}")
        return lse

    return {"topk_mask_1e7 (baseline lib)": topk_mask, "softmax_scores (baseline lib)": softmax_scores}


def _child(args) -> dict:
    """Times every case in this process (OMP_NUM_THREADS is already set) and returns the medians."""
    import torch

    import aql_kernels
    from benchmarks.bench_scores import eager_composite

    torch.manual_seed(0)
    scores = torch.rand(N_SELECT)
    k = int(FRACTION * N_SELECT)
    logits = torch.randn(*SCORES_SHAPE) * 3
    targets = torch.randint(0, SCORES_SHAPE[1], (SCORES_SHAPE[0],))
    select_bytes, logits_bytes = scores.numel() * 4, logits.numel() * 4
    cases = {
        "sum_1e7": (lambda: scores.sum(), select_bytes),
        "topk_mask_1e7": (lambda: aql_kernels.topk_mask(scores, k), select_bytes),
        "sum_scores": (lambda: logits.sum(), logits_bytes),
        "softmax_scores": (lambda: aql_kernels.softmax_scores(logits, targets), logits_bytes),
    }
    if args.baseline_lib:
        library = _load_baseline(args.baseline_lib)
        for name, fn in _baseline_cases(library, scores, k, logits, targets).items():
            cases[name] = (fn, select_bytes if "topk" in name else logits_bytes)
        # The same answers: a faster kernel that differs is no result.
        new, old = aql_kernels.topk_mask(scores, k), cases["topk_mask_1e7 (baseline lib)"][0]()
        if not torch.equal(new, old):
            raise RuntimeError("topk_mask differs from the baseline library's")
    if args.compile:
        compiled = torch.compile(eager_composite)
        compiled(logits, targets)  # compile outside the timed loop
        cases["compiled_composite"] = (lambda: compiled(logits, targets), logits_bytes)
    times: dict[str, list[float]] = {name: [] for name in cases}
    cpu_times: dict[str, list[float]] = {name: [] for name in cases}
    for name, (fn, _) in cases.items():  # warm-up: page faults, first-call set-up
        fn()
    for _ in range(args.repeats):
        for name, (fn, _) in cases.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
               "gb_per_s": cases[name][1] / statistics.median(t) / 1e9, "cpu_median_ms": 1e3 * statistics.median(cpu_times[name])}
        for name, t in times.items()
    }


def _report(threads: int, result: dict) -> None:
    print(f"\n== {threads} thread(s); medians of the interleaved repeats (wall; cpu = process CPU time, all threads) ==")
    print(f"{'case':34s} {'median ms':>10s} {'min..max ms':>16s} {'GB/s':>7s} {'of sum':>7s} {'cpu ms':>8s} {'cpu of sum':>10s}")
    for name, row in result.items():
        floor = result["sum_1e7" if "1e7" in name else "sum_scores"]
        spread = f"{row['min_ms']:.1f}..{row['max_ms']:.1f}"
        print(f"{name:34s} {row['median_ms']:10.2f} {spread:>16s} {row['gb_per_s']:7.2f} {row['gb_per_s'] / floor['gb_per_s']:7.0%}"
              f" {row['cpu_median_ms']:8.2f} {floor['cpu_median_ms'] / row['cpu_median_ms']:10.0%}")
    if "compiled_composite" in result:
        ratio = result["compiled_composite"]["median_ms"] / result["softmax_scores"]["median_ms"]
        print(f"softmax_scores vs torch.compile'd composite: {ratio:.1f}x faster")
    for name in ("topk_mask_1e7", "softmax_scores"):
        baseline = result.get(f"{name} (baseline lib)")
        if baseline is not None:
            print(f"{name}: {baseline['median_ms'] / result[name]['median_ms']:.2f}x the baseline library's speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline-lib", default=None, help="directory of another libaql_cpu.so to time side by side")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager composite (slow to compile)")
    parser.add_argument("--json", default=None, help="write the medians here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 (medians of at least 5), got {args.repeats}")
    if args.child:
        print(json.dumps(_child(args)))
        return
    results = {}
    for threads in args.threads:
        if threads < 1:
            parser.error(f"--threads must be >= 1, got {threads}")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        command = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)]
        if args.baseline_lib:
            command += ["--baseline-lib", args.baseline_lib]
        if args.compile:
            command.append("--compile")
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        results[threads] = json.loads(output.strip().splitlines()[-1])
        _report(threads, results[threads])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
