"""Per-call host cost of the fused loss and statistics on tiny inputs, against F.cross_entropy.

At these shapes the arithmetic is a few microseconds; what is timed is the Python layer (argument
checks, dispatch, autograd plumbing, allocation) and the C call. Every case runs interleaved with its
torch peer in one process: each repeat times every case once (a block of `--calls` calls; aql and
its peer take turns going first), the printed figure is the median over `--repeats` repeats of the
per-call time, so that drifts in the machine's load hit both columns alike.

Cases (CPU, float32; targets with ~10% ignore_index):
  fwd+bwd   cross_entropy_with_scores(x, t)[0].backward()  vs  F.cross_entropy(x, t).backward()
  fwd       softmax_scores(x, t)                           vs  F.cross_entropy(x, t, reduction="none")
  seq       cross_entropy_with_scores on [B, T, V] with shift=True, per_sample="mean", fwd+bwd
            vs  F.cross_entropy(x[:, :-1].flatten(0, 1), t[:, 1:].flatten()).backward()
  fisher    fisher_ema_ on the 8 parameter tensors of the MNIST-1D CNN (channels 32, 32, 32), new
            gradient tensors every call (as zero_grad(set_to_none=True) leaves them)
            vs  torch._foreach_mul_ + torch._foreach_addcmul_ on the same lists
  topk      topk_indices(x, n // 5) of n uniform float32 scores (n = 640, 2560, 16384: the selector's
            one-thread small path)  vs  torch.topk(x, n // 5, sorted=False)

AQL_TORCH_EXTENSION=0 switches off the C++ eager route (aql_kernels._C) and times the Python route.

    OMP_NUM_THREADS=1 python -m benchmarks.host_cost            # 1 thread (the default)
    OMP_NUM_THREADS=2 python -m benchmarks.host_cost --threads 2 --repeats 9

--threads sets torch's threads; the C library's OpenMP team follows OMP_NUM_THREADS (its own
runtime), so set both alike. The header line names the machine and its load average: on a shared
machine compare the ratio column, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from aql_kernels import backends, cross_entropy_with_scores, fisher_ema_, softmax_scores, topk_indices

IGNORE = -100


def _inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    *rows, v = shape
    logits = torch.randn(*rows, v, generator=generator) * 3
    targets = torch.randint(0, v, tuple(rows), generator=generator)
    targets[torch.rand(tuple(rows), generator=generator) < 0.1] = IGNORE
    return logits, targets


def _cases(shapes):
    """(label, aql callable, torch callable) for every shape."""
    cases = []
    for shape in shapes:
        logits, targets = _inputs(shape)
        leaf = logits.clone().requires_grad_(True)
        name = "x".join(map(str, shape))

        def aql_fwd_bwd(x=leaf, t=targets):
            cross_entropy_with_scores(x, t)[0].backward()
            x.grad = None

        def torch_fwd_bwd(x=leaf, t=targets):
            F.cross_entropy(x, t).backward()
            x.grad = None

        cases.append((f"fwd+bwd [{name}]", aql_fwd_bwd, torch_fwd_bwd))
        cases.append((f"fwd     [{name}]", lambda x=logits, t=targets: softmax_scores(x, t),
                      lambda x=logits, t=targets: F.cross_entropy(x, t, reduction="none")))
    return cases


def _sequence_case(shape):
    logits, targets = _inputs(shape)
    leaf = logits.requires_grad_(True)
    name = "x".join(map(str, shape))

    def aql(x=leaf, t=targets):
        cross_entropy_with_scores(x, t, shift=True, per_sample="mean")[0].backward()
        x.grad = None

    def reference(x=leaf, t=targets):
        F.cross_entropy(x[:, :-1].flatten(0, 1), t[:, 1:].flatten()).backward()
        x.grad = None

    return f"seq     [{name}] shift", aql, reference


def _fisher_case():
    from aql.models import MNIST1DCNN

    shapes = [p.shape for p in MNIST1DCNN(channels=(32, 32, 32)).parameters()]
    generator = torch.Generator().manual_seed(0)
    fisher = [torch.rand(shape, generator=generator) for shape in shapes]
    peer_fisher = [f.clone() for f in fisher]
    # a pool of gradient lists at different addresses, taken in turn: fresh tensors every call
    pool = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(32)]
    turn = [0, 0]

    def aql():
        turn[0] = (turn[0] + 1) % len(pool)
        fisher_ema_(fisher, pool[turn[0]], 0.95)

    def peer():
        turn[1] = (turn[1] + 1) % len(pool)
        grads = pool[turn[1]]
        torch._foreach_mul_(peer_fisher, 0.95)
        torch._foreach_addcmul_(peer_fisher, grads, grads, value=0.05)

    return f"fisher  [{len(shapes)} tensors, {sum(math.prod(s) for s in shapes)}]", aql, peer


def _select_cases(sizes):
    """topk_indices of k = n / 5 uniform scores against torch.topk(sorted=False) (the values and indices
    of the top k, unordered): the selector's small path, one thread."""
    cases = []
    for n in sizes:
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
        cases.append((f"topk    [n={n}, k={n // 5}]", lambda x=scores, k=n // 5: topk_indices(x, k),
                      lambda x=scores, k=n // 5: torch.topk(x, k, sorted=False)))
    return cases


def _time_block(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed block")
    parser.add_argument("--no-sequences", action="store_true", help="skip the [B, T, V] case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = _cases([(64, 10), (512, 10), (256, 1000)])
    if not args.no_sequences:
        cases.append(_sequence_case((8, 64, 100)))
    cases.append(_fisher_case())
    cases += _select_cases([640, 2560, 16384])
    times = {label: ([], []) for label, _, _ in cases}
    for label, aql, peer in cases:  # warm-up (first-call dispatch choice, allocator)
        _time_block(aql, 20)
        _time_block(peer, 20)
    for repeat in range(args.repeats):
        for label, aql, peer in cases:  # who goes first alternates: the second of a pair runs on warmer caches
            if repeat % 2:
                times[label][1].append(_time_block(peer, args.calls))
                times[label][0].append(_time_block(aql, args.calls))
            else:
                times[label][0].append(_time_block(aql, args.calls))
                times[label][1].append(_time_block(peer, args.calls))
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    extension = backends()["cpu_extension"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load}); torch "
          f"{torch.__version__}, {args.threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"median of {args.repeats} repeats x {args.calls} calls; C++ eager route (aql_kernels._C): "
          f"{'on' if extension.available else 'off (' + extension.detail + ')'}")
    print("| case | aql (us) | torch (us) | aql / torch |")
    print("|---|---|---|---|")
    for label, _, _ in cases:
        a, b = (statistics.median(t) * 1e6 for t in times[label])
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
