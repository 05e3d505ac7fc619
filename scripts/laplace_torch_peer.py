"""laplace-torch, the peer library, on Experiment 1's data and models (`make peer-laplace`).

For each seed this trains the Experiment 1 model exactly as `python -m aql experiment uncertainty`
does (`aql.experiments.run_uncertainty_experiment`, which also scores aql's estimators), then fits
laplace-torch's last-layer Laplace approximation (diagonal and Kronecker-factored GGN) on the same
trained model and training split, fits its prior precision by the marginal likelihood, and scores the
same test and out-of-distribution inputs with the linearised (GLM, probit) predictive. Scores: the
predictive entropy (the library's usual OOD score) and 1 - max probability. Cost: one scoring call
over the 2000 test rows divided by a plain `model(x)` over the same rows, timed alternately in one
process (`aql.experiments.relative_cost`); the fit (one pass over the training data) and the prior
optimisation are timed separately.

laplace-torch pulls torchvision and another torch, so it lives in its own environment, never in aql's:

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch==2.13.0 laplace-torch pyyaml tqdm matplotlib
    .venv-peer/bin/pip uninstall -y torchvision   # torchmetrics imports it only when present
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv-peer/bin/python scripts/laplace_torch_peer.py \
        --output results/experiments/uncertainty/laplace_torch_peer.json

(aql's native library is loaded from the working tree: run `make native` first.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _scores(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    probs = probs.double()
    return {"entropy": -torch.special.xlogy(probs, probs).sum(dim=1), "one_minus_maxprob": 1.0 - probs.max(dim=1).values}


def run_seed(seed: int, structures: list[str], cost_rounds: int) -> dict:
    import laplace
    from aql.experiments import auroc, relative_cost, run_uncertainty_experiment

    with tempfile.TemporaryDirectory() as scratch:
        ours = run_uncertainty_experiment(scratch, seed=seed, cost_rounds=1, quiet=True, keep_model=True)
    model, train, inputs = (ours["artifacts"][k] for k in ("model", "train", "inputs"))
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.inputs, train.targets), batch_size=128)
    x_test = inputs["test"]

    def forward():
        with torch.no_grad():
            return model(x_test)

    result = {"seed": seed, "test_accuracy": ours["test_accuracy"],
              "aql_default_auroc_mean": ours["methods"]["laplace_epistemic"]["auroc_mean"]
              if "laplace_epistemic" in ours["methods"] else None, "methods": {}}
    for structure in structures:
        la = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure)
        start = time.perf_counter()
        la.fit(loader)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        la.optimize_prior_precision(method="marglik")
        prior_s = time.perf_counter() - start

        def predict(x, la=la):
            with torch.no_grad():
                return la(x, pred_type="glm", link_approx="probit")

        scored = {name: _scores(predict(x)) for name, x in inputs.items()}
        for score in ("entropy", "one_minus_maxprob"):
            by_set = {name: auroc(scored["test"][score], scored[name][score]) for name in inputs if name != "test"}
            result["methods"][f"laplace_torch_last_layer_{structure}_{score}"] = {
                "auroc_shuffled": by_set["shuffled"], "auroc_noise": by_set["noise"],
                "auroc_mean": (by_set["shuffled"] + by_set["noise"]) / 2,
                **{f"auroc_{k}": v for k, v in by_set.items() if k not in ("shuffled", "noise")},
                "fit_s": fit_s, "prior_optimisation_s": prior_s,
                "prior_precision": [float(v) for v in torch.as_tensor(la.prior_precision).flatten()],
            }
        cost = relative_cost(lambda: predict(x_test), forward, rounds=cost_rounds)
        for score in ("entropy", "one_minus_maxprob"):
            result["methods"][f"laplace_torch_last_layer_{structure}_{score}"]["relative_cost"] = cost
        print(f"seed {seed} {structure}: AUROC mean (entropy) "
              f"{result['methods'][f'laplace_torch_last_layer_{structure}_entropy']['auroc_mean']:.3f}, "
              f"cost {cost:.2f}x a forward, fit {fit_s:.1f} s + prior {prior_s:.1f} s", flush=True)
    return result


def summarise(runs: list[dict]) -> dict:
    methods = {}
    for name in runs[0]["methods"]:
        metrics = {}
        for metric, value in runs[0]["methods"][name].items():
            if isinstance(value, float):
                values = [r["methods"][name][metric] for r in runs]
                metrics[metric] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                   "values": values}
        methods[name] = metrics
    return {"seeds": [r["seed"] for r in runs], "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--structures", nargs="+", default=["diag", "kron"], choices=["diag", "kron", "full"])
    parser.add_argument("--cost-rounds", type=int, default=21)
    parser.add_argument("--output", default="results/experiments/uncertainty/laplace_torch_peer.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import laplace

    runs = [run_seed(seed, args.structures, args.cost_rounds) for seed in args.seeds]
    out = {"experiment": "uncertainty (Experiment 1): laplace-torch peer on the same models and inputs",
           "command": "PYTHONPATH=. OMP_NUM_THREADS=1 .venv-peer/bin/python scripts/laplace_torch_peer.py " + " ".join(argv or sys.argv[1:]),
           "versions": {"laplace-torch": getattr(laplace, "__version__", "0.3"), "torch": torch.__version__,
                        "python": platform.python_version()},
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "torch_threads": torch.get_num_threads()},
           "settings": {"predictive": "glm, probit", "prior": "optimize_prior_precision(method='marglik')",
                        "subset_of_weights": "last_layer"},
           "runs": runs, "summary": summarise(runs)}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    for name, metrics in out["summary"]["methods"].items():
        print(f"{name}: AUROC mean {metrics['auroc_mean']['mean']:.3f} +- {metrics['auroc_mean']['std']:.3f}, "
              f"cost {metrics['relative_cost']['mean']:.2f}x, fit {metrics['fit_s']['mean']:.1f} s")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
