"""`make bench`: run the benchmark suites, keep their JSON per machine, render benchmarks/RESULTS.md
and its plots.

    python -m benchmarks.run               # all suites (make bench)
    python -m benchmarks.run --quick       # fewer sizes and rounds, no torch.compile peers (make bench-quick)
    python -m benchmarks.run --render-only benchmarks/results/<machine>/<run>.json   # RESULTS.md from a saved run

The JSON goes to benchmarks/results/<machine>/<UTC date>_<commit>[_quick].json, where <machine> is a
short slug of the GPU name (CUDA) or the CPU model and core count. RESULTS.md names the device,
versions, date, command and the machine's load; the plots go to benchmarks/results/<machine>/plots/:
scores throughput against V, select time against N per peer, overhead % per strategy and estimator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "benchmarks" / "RESULTS.md"
SUITES = ["benchmarks/bench_scores.py", "benchmarks/bench_fisher.py", "benchmarks/bench_select.py",
          "benchmarks/bench_uncertainty.py", "benchmarks/bench_overhead.py"]


# ---- the run ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug() -> str:
    """`nvidia-h100-80gb-hbm3` for a GPU machine, `amd-epyc-2c` for a 2-core AMD EPYC CPU machine."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu_model()} {os.cpu_count()}c"
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*?ghz", " ", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48] or "unknown"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nocommit"


def run_suites(quick: bool, expression: str | None, suites: list[str], machine: str) -> tuple[Path, int, dict]:
    """Runs pytest-benchmark on `suites`; returns the JSON path, pytest's exit code and the run's context."""
    now = datetime.datetime.now(datetime.timezone.utc)
    folder = RESULTS / machine
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{now:%Y%m%d-%H%M}_{_commit()}{'_quick' if quick else ''}.json"
    command = [sys.executable, "-m", "pytest", *suites, "--benchmark-only", f"--benchmark-json={path}",
               "--benchmark-columns=median,iqr,rounds", "-q", "-p", "no:cacheprovider"]
    if expression:
        command += ["-k", expression]
    env = dict(os.environ, AQL_BENCH_QUICK="1" if quick else "0")
    load_before = os.getloadavg()
    start = datetime.datetime.now(datetime.timezone.utc)
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    seconds = (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds()
    context = {"command": "python -m benchmarks.run" + (" --quick" if quick else "") + (f" -k {expression!r}" if expression else "")
               + (" (make bench" + (" QUICK=1" if quick else "") + " runs it after make native)" if not expression else ""),
               "pytest": " ".join(["python", *command[1:]]).replace(str(ROOT) + "/", ""), "quick": quick,
               "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
               "seconds": round(seconds, 1), "commit": _commit(), "machine": machine}
    if path.exists():  # the context beside pytest-benchmark's own record
        data = json.loads(path.read_text())
        data["aql_run"] = context
        path.write_text(json.dumps(data, indent=1))
    return path, code, context


# ---- reading a run ----------------------------------------------------------------------------------
def _groups(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or "-"].append(bench)
    return groups


def _peer(bench: dict) -> str:
    extra = bench.get("extra_info", {})
    return str(extra.get("peer") or extra.get("variant") or extra.get("implementation") or bench["param"] or bench["name"])


def _find(data: dict, group_prefix: str, peer: str) -> dict | None:
    for bench in data.get("benchmarks", []):
        if (bench.get("group") or "").startswith(group_prefix) and _peer(bench) == peer:
            return bench
    return None


def _median(bench: dict | None) -> float | None:
    return None if bench is None else bench["stats"]["median"]


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _goal_row(what: str, extra: dict, prefix: str, peer: str) -> tuple[str, str, str, str]:
    """A headline row of the goal measurement: the median paired overhead `<prefix>overhead_pct` and its
    quartiles against the baseline described by `peer`."""
    return (what, f"{extra['step_us'] / 1e3:.2f} ms", peer,
            f"{extra[prefix + 'overhead_pct']:+.1f}% (quartiles {extra[prefix + 'overhead_pct_q25']:+.1f}.."
            f"{extra[prefix + 'overhead_pct_q75']:+.1f}%, {extra['repeats']} paired repeats)")


def headline_rows(data: dict) -> list[tuple[str, str, str, str]]:
    """(what, aql, peer, ratio) rows of the headline table; a row whose cases did not run is left out."""
    rows = []

    def ratio_row(what: str, group: str, ours: str, peer: str, peer_label: str, *, note: str = ""):
        a, b = _find(data, group, ours), _find(data, group, peer)
        if a is None or b is None:
            return
        ratio = _median(b) / _median(a)
        extra = a.get("extra_info", {})
        bandwidth = f"; {extra['GB/s']} GB/s = {extra['fraction_of_read']:.0%} of x.sum()'s read" if "fraction_of_read" in extra else ""
        rows.append((what, _time(_median(a)) + bandwidth, f"{peer_label} {_time(_median(b))}",
                     f"{ratio:.2f}x faster{note}" if ratio >= 1 else f"{1 / ratio:.2f}x slower{note}"))

    ratio_row("kernel: fused loss fwd+bwd, [64, 10] fp32 (host cost)", "scores cpu fwd+bwd 64x10", "aql_cross_entropy_with_scores",
              "torch_cross_entropy", "F.cross_entropy")
    ratio_row("kernel: fused loss fwd+bwd, [512, 10]", "scores cpu fwd+bwd 512x10", "aql_cross_entropy_with_scores", "torch_cross_entropy",
              "F.cross_entropy")
    ratio_row("kernel: fused loss fwd+bwd, [256, 1000]", "scores cpu fwd+bwd 256x1000", "aql_cross_entropy_with_scores",
              "torch_cross_entropy", "F.cross_entropy")
    ratio_row("kernel: softmax_scores vs F.cross_entropy(reduction='none'), [64, 10]", "scores cpu fwd 64x10", "aql_softmax_scores",
              "torch_cross_entropy", "F.cross_entropy")
    ratio_row("kernel: softmax_scores (7 statistics), 4096 x 32000 fp32", "scores cpu fwd 4096x32000", "aql_softmax_scores",
              "torch_compile_composite", "torch.compile composite")
    ratio_row("kernel: softmax_scores vs eager composite, 4096 x 32000", "scores cpu fwd 4096x32000", "aql_softmax_scores",
              "torch_eager_composite", "eager composite")
    ratio_row("kernel: fused loss fwd+bwd, 4096 x 32000 fp32", "scores cpu fwd+bwd 4096x32000", "aql_cross_entropy_with_scores",
              "torch_compile_cross_entropy", "compiled F.cross_entropy")
    ratio_row("kernel: fused loss fwd+bwd vs eager, 4096 x 32000", "scores cpu fwd+bwd 4096x32000", "aql_cross_entropy_with_scores",
              "torch_cross_entropy", "F.cross_entropy")
    ratio_row("kernel: fisher_ema_, MNIST-1D CNN's 8 tensors (host cost)", "fisher_ema cpu float32 grads, MNIST-1D", "aql fisher_ema_",
              "torch foreach", "foreach mul_+addcmul_")
    ratio_row("kernel: fisher_ema_, GPT-2-shaped ~50M parameters", "fisher_ema cpu float32 grads, GPT-2", "aql fisher_ema_",
              "torch foreach", "foreach mul_+addcmul_")
    ratio_row("kernel: ScoreStore.update, 64 rows (checked; host cost)", "score store write cpu", "aql_score_store_update",
              "torch_index_copy_", "index_copy_")
    for size in ("1e7", "1e6"):
        if _find(data, f"select cpu N={size}", "aql_topk_mask") is not None:
            ratio_row(f"kernel: topk_mask (mask included), N = {size}, k = 0.2 N", f"select cpu N={size}", "aql_topk_mask",
                      "numpy_partition", "numpy.partition")
            ratio_row(f"kernel: topk_mask vs torch.topk, N = {size}", f"select cpu N={size}", "aql_topk_mask", "torch_topk_unsorted",
                      "torch.topk")
            break
    what = {"fused_loss": "the fused loss alone",
            "strategy:stale": "fused loss + stale selection (score writes, selection amortised)",
            "machinery:stale+fisher": "the whole machinery: fused loss + score writes + Fisher every step + selection",
            "machinery:stale+laplace": "the whole machinery with the default Laplace estimator (Fisher + density statistics every step)",
            "strategy:online": "the demo's online selection (no-grad scoring forward of 5x candidates)"}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if (bench.get("group") or "").startswith("goal") and extra.get("variant") in what and "overhead_pct_q25" in extra:
            title = f"end to end, the < 1% goal: {extra['model']} training step, {what[extra['variant']]}"
            rows.append(_goal_row(title, extra, "", f"F.cross_entropy step {extra['baseline_step_us'] / 1e3:.2f} ms"))
            if "subset_overhead_pct" in extra:
                rows.append(_goal_row(f"{title}; against the same plan-driven loop on random subsets (strategy random, "
                                      "F.cross_entropy)", extra, "subset_",
                                      f"random-subset step {extra['subset_baseline_step_us'] / 1e3:.2f} ms"))
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if (bench.get("group") or "").startswith("overhead") and extra.get("variant") in what and "overhead_pct" in extra:
            rows.append((f"end to end: {extra['model']} training step, {what[extra['variant']]}",
                         f"{extra['step_us'] / 1e3:.2f} ms", f"F.cross_entropy step {extra['baseline_step_us'] / 1e3:.2f} ms",
                         f"{extra['overhead_pct']:+.1f}% (repeats {extra['overhead_pct_min']:+.1f}..{extra['overhead_pct_max']:+.1f}%)"))
    return rows


def _overhead_tables(data: dict) -> list[str]:
    lines = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if (bench.get("group") or "").startswith("overhead") and "overhead_pct" in extra:
            by_model[bench["group"]].append(extra)
    for group, rows in by_model.items():
        first = rows[0]
        lines += [f"### {group}", "",
                  f"{first['model']}, batch {first['batch_size']}, {first['num_samples']} samples, {first['threads']} thread(s), "
                  f"budget {first['budget']}, {first['repeats']} repeats x {first['epochs_per_repeat']} epoch(s) per variant, "
                  "all variants interleaved in one process. overhead = step / F.cross_entropy step - 1, median over the repeats "
                  "(each repeat's pair timed back to back) and its range.", "",
                  "| variant | time per step | overhead vs F.cross_entropy | range over repeats |", "|---|---|---|---|"]
        for extra in sorted(rows, key=lambda e: e["overhead_pct"]):
            lines.append(f"| {extra['variant']} | {extra['step_us'] / 1e3:.2f} ms | {extra['overhead_pct']:+.1f}% | "
                         f"{extra['overhead_pct_min']:+.1f}% .. {extra['overhead_pct_max']:+.1f}% |")
        lines.append("")
    return lines


def _group_tables(data: dict) -> list[str]:
    lines = []
    for group, benches in sorted(_groups(data).items()):
        if group.startswith("overhead"):
            continue
        fastest = min(b["stats"]["median"] for b in benches)
        has_traffic = any("fraction_of_read" in b.get("extra_info", {}) for b in benches)
        lines += [f"### {group}", "", "| case | median | IQR | rounds | x fastest |" + (" GB/s | of read bw |" if has_traffic else ""),
                  "|---|---|---|---|---|" + ("---|---|" if has_traffic else "")]
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            stats, extra = bench["stats"], bench.get("extra_info", {})
            row = (f"| {_peer(bench)} | {_time(stats['median'])} | {_time(stats['iqr'])} | {stats['rounds']} | "
                   f"{stats['median'] / fastest:.2f} |")
            if has_traffic:
                row += (f" {extra.get('GB/s', '')} | {extra['fraction_of_read']:.0%} |" if "fraction_of_read" in extra else " | |")
            if "relative_to_forward" in extra:
                row += f" x{extra['relative_to_forward']} of one forward (alternating) |"
            lines.append(row)
        lines.append("")
    return lines


# ---- plots ------------------------------------------------------------------------------------------
def render_plots(data: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sweeps: dict[str, dict[str, list[tuple[float, float, dict]]]] = defaultdict(lambda: defaultdict(list))
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if extra.get("sweep") and "cuda" not in (bench.get("group") or ""):
            x = extra["v"] if extra["sweep"] == "scores_by_vocab" else extra["n"]
            sweeps[extra["sweep"]][_peer(bench)].append((x, bench["stats"]["median"], extra))
    if sweeps.get("scores_by_vocab"):
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for peer, points in sorted(sweeps["scores_by_vocab"].items()):
            points.sort()
            axes.plot([p[0] for p in points], [p[2].get("GB/s", 0) for p in points], marker="o", label=peer)
        read = next((p[2].get("read_GB/s") for points in sweeps["scores_by_vocab"].values() for p in points), None)
        if read:
            axes.axhline(read, color="gray", linestyle="--", label=f"x.sum() read bandwidth ({read:.1f} GB/s)")
        axes.set_xscale("log")
        axes.set_xlabel("V (classes / vocabulary), N = 1024 rows, float32")
        axes.set_ylabel("GB/s (one read of the logits / median time)")
        axes.set_title("softmax statistics: throughput against V (CPU)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        written.append(_save(figure, folder / "scores_throughput_vs_v.png"))
    if sweeps.get("select_by_n"):
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for peer, points in sorted(sweeps["select_by_n"].items()):
            points.sort()
            axes.plot([p[0] for p in points], [p[1] * 1e3 for p in points], marker="o", label=peer)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("N (scores), k = 0.2 N")
        axes.set_ylabel("median time (ms)")
        axes.set_title("exact top-k selection: time against N (CPU)")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=8)
        written.append(_save(figure, folder / "select_time_vs_n.png"))
    overhead: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if (bench.get("group") or "").startswith("overhead") and "overhead_pct" in extra and extra["variant"] != "cross_entropy":
            overhead[extra["model"]].append(extra)
    if overhead:
        figure, all_axes = plt.subplots(1, len(overhead), figsize=(6.0 * len(overhead), 4.6), squeeze=False)
        for axes, (model, rows) in zip(all_axes[0], sorted(overhead.items())):
            rows.sort(key=lambda e: e["variant"])
            labels = [e["variant"] for e in rows]
            values = [e["overhead_pct"] for e in rows]
            low = [e["overhead_pct"] - e["overhead_pct_min"] for e in rows]
            high = [e["overhead_pct_max"] - e["overhead_pct"] for e in rows]
            axes.barh(labels, values, xerr=[low, high], color=["C1" if v > 1 else "C0" for v in values], capsize=3)
            axes.axvline(1.0, color="gray", linestyle="--", label="1% goal")
            axes.axvline(0.0, color="black", linewidth=0.8)
            axes.set_xscale("symlog", linthresh=10)
            axes.set_xlabel("% over the F.cross_entropy step (median, range of 3 repeats)")
            axes.set_title(f"{model}: overhead per training step")
            axes.legend(fontsize=8)
        figure.tight_layout()
        written.append(_save(figure, folder / "overhead_per_strategy.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


# ---- RESULTS.md -------------------------------------------------------------------------------------
def render(json_path: Path, report: Path = REPORT, note: str | None = None) -> Path:
    """RESULTS.md and the plots from a run's JSON; `note` (e.g. what else ran on the machine) goes under
    the run's description."""
    data = json.loads(Path(json_path).read_text())
    context = data.get("aql_run", {})
    machine = context.get("machine") or Path(json_path).parent.name
    plots = render_plots(data, Path(json_path).parent / "plots")
    extra = data["benchmarks"][0].get("extra_info", {}) if data.get("benchmarks") else {}
    info = data.get("machine_info", {})
    device = extra.get("gpu") or info.get("cpu", {}).get("brand_raw") or cpu_model()
    relative = os.path.relpath(json_path, report.parent)
    lines = [
        "# Benchmark results",
        "",
        f"Rendered by `python -m benchmarks.run` from [{Path(json_path).name}]({relative}); do not edit by hand.",
        "",
        f"- device: {device} ({info.get('cpu', {}).get('count', os.cpu_count())} logical cores"
        f"{', GPU ' + extra['gpu'] if extra.get('gpu') else ', no GPU'}); machine folder `{machine}`",
        f"- versions: torch {extra.get('torch')}, triton {extra.get('triton')}, Python {extra.get('python')}, "
        f"pytest-benchmark {data.get('version')}",
        f"- date: {data.get('datetime', '')[:19]} UTC, commit {context.get('commit') or data.get('commit_info', {}).get('id', '')[:7]}",
        f"- command: `{context.get('command', 'python -m benchmarks.run')}` (pytest: `{context.get('pytest', '')}`), "
        f"{context.get('seconds', '?')} s",
        f"- load average (1, 5, 15 min) before: {context.get('load_before')}, after: {context.get('load_after')}. "
        + ("The machine was shared with other jobs during this run (load above its core count): absolute times are "
           "noisy; ratios of cases timed next to each other hold better, and the end-to-end overheads come from "
           "variants interleaved in one process." if max((context.get("load_before") or [0])[:1] + (context.get("load_after") or [0])[:1])
           > (os.cpu_count() or 1) else "Load below the core count at the start and the end; on a shared machine other jobs "
           "may still have run in between, so compare cases timed side by side rather than absolute times."),
        *([f"- note: {note}"] if note else []),
        "",
        "Kernel ratios compare one op with its peer on the same input; they are not end-to-end ratios. The end-to-end "
        "figures are whole training steps (forward, loss, backward, AdamW) of a model, in bench_overhead.py.",
        "",
        "## Headline",
        "",
        "| what is measured | aql | peer | ratio |",
        "|---|---|---|---|",
        *[f"| {what} | {ours} | {peer} | {ratio} |" for what, ours, peer, ratio in headline_rows(data)],
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, report.parent)})" for p in plots]
        lines.append("")
    overhead = _overhead_tables(data)
    if overhead:
        lines += ["## End to end: overhead per training step", "", *overhead]
    lines += ["## Every group", "", "Cases of a group ran one after another in one process; `x fastest` is the median "
              "over the fastest case's. GB/s counts the case's traffic floor (one-pass bytes) over the median; "
              "`of read bw` holds it against `x.sum()` over 256 MiB, timed right after the case with the same thread count "
              "(issue 14's yardstick, not a hard ceiling: a kernel that streams reads and writes from several threads can "
              "exceed what torch's reduction reads).", "",
              *_group_tables(data)]
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds, no torch.compile peers")
    parser.add_argument("-k", dest="expression", help="pytest -k expression")
    parser.add_argument("--suites", nargs="+", default=SUITES, help="pytest files (default: %(default)s)")
    parser.add_argument("--machine", help="results folder name (default: a slug of the GPU or CPU)")
    parser.add_argument("--render-only", metavar="JSON", help="render RESULTS.md and plots from a saved run")
    parser.add_argument("--report", default=str(REPORT), help="where RESULTS.md goes (default: %(default)s)")
    parser.add_argument("--note", help="a line for RESULTS.md about the run (e.g. the machine's other load)")
    args = parser.parse_args(argv)
    if args.render_only:
        print(render(Path(args.render_only), Path(args.report), args.note))
        return 0
    path, code, context = run_suites(args.quick, args.expression, args.suites, args.machine or machine_slug())
    if not path.exists():
        print(f"benchmarks.run: pytest wrote no JSON (exit {code})", file=sys.stderr)
        return code or 1
    print(f"results: {path.relative_to(ROOT)} ({context['seconds']} s)")
    print(f"report: {render(path, Path(args.report), args.note)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
