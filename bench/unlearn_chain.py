"""Deletion requests as a stream (by default digits, MLP 64-128-10, the train recipe's defaults): dmm unlearns 5 chained
requests of 2 % of the training rows each (disjoint, random), every request starting from the model the previous one
produced, with one datamodel fitted once on the first model. After 1, 3 and 5 requests, KLoM95 on forget / retain /
test of K originals that each replayed the chain (workers/unlearning/chain.py, what `evaluate.oracles` runs for a
chained job) against oracles retrained on the cumulative retain set, beside the oracle-vs-oracle floor and the
do-nothing original. Runs the workers' own code in process, not through the API.

    .venv/bin/python bench/unlearn_chain.py --k 16          # about 10 min on 2 shared cores
    .venv/bin/python bench/unlearn_chain.py --k 32 --attribution-models 192
    .venv/bin/python bench/unlearn_chain.py --dataset mnist5k --arch cnn --epochs 15 --k 8 --requests 3 \
        --attribution-models 64 --attribution-cache /tmp/sweep-cnn/attribution.npz --out unlearn_chain_cnn.json

The attribution cache is bench/unlearn_klom.py's format, so bench/unlearn_sweep.py's `--cache DIR/attribution.npz`
for the same dataset and recipe serves here too.

Writes bench/results/unlearn_chain.json (or --out NAME under bench/results/)."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.unlearn_klom import attribution_size, builtin_split, cached_attribution, recipe_from_args  # noqa: E402
from core.methods.train import TrainParams  # noqa: E402
from workers.methods.unlearn import rows_to_match  # noqa: E402
from workers.unlearning.algorithms import PARAMS  # noqa: E402
from workers.unlearning.chain import Step, evaluate_chain  # noqa: E402
from workers.unlearning.ensemble import Shared  # noqa: E402
from workers.unlearning.fitting import Recipe  # noqa: E402

SEED = 0
SHARE = 0.02
RESULTS = ROOT / "bench" / "results"


def run(k: int, lengths: list[int], attribution_models: int, out: Path, overrides: dict, cache: Path | None,
        dataset: str = "digits", recipe: Recipe | None = None) -> dict:
    train, test = builtin_split(dataset)
    recipe = recipe or Recipe("mlp", {"hidden": [128]}, TrainParams())
    deadline = time.time() + 24 * 3600
    base = Shared(train, test, np.zeros(len(train), dtype=bool), recipe, deadline)
    started = time.perf_counter()
    attribution, attribution_seconds = cached_attribution(base, attribution_size(attribution_models, len(train)), cache)
    print(f"datamodel of the first model: {attribution_models} subset models in {attribution_seconds:.1f} s "
          "(once for the whole chain)", flush=True)
    size = round(SHARE * len(train))
    order = np.random.default_rng(1).permutation(len(train))
    params = PARAMS["dmm"](attribution_models=attribution_models, **overrides)
    steps, forget = [], np.zeros(len(train), dtype=bool)
    for request in range(max(lengths)):
        forget = forget.copy()
        forget[order[request * size:(request + 1) * size]] = True
        # Each request as its job runs it: its seed, its cumulative forget set, the shift from the first model.
        match = rows_to_match(forget, params, SEED)
        shift = attribution.predicted_shift(train.y, forget, len(train.classes))[match]
        steps.append(Step("dmm", params.model_dump(mode="json"), forget, match, shift))
    results = {"setting": {"data": f"builtin://{dataset}, {len(train)} train / {len(test)} test rows",
                           "model": f"{recipe.arch} {json.dumps(recipe.args)}",
                           "recipe": recipe.params.model_dump(mode="json"),
                           "requests": f"disjoint random {SHARE:.0%} of training rows ({size} rows) each, "
                                       "numpy default_rng(1) permutation",
                           "algorithm": "dmm", "params": params.model_dump(mode="json"), "k": k,
                           "attribution_models": attribution_models,
                           "attribution_seconds": round(attribution_seconds, 1)},
               "runs": []}
    for length in lengths:
        t0 = time.perf_counter()
        last = steps[length - 1]
        shared = Shared(train, test, last.forget, recipe, deadline, "dmm", last.params, last.match, last.match_shift)
        report = evaluate_chain(shared, steps[:length], k, SEED, None, lambda done: None)
        row = {"requests": length, "forget_rows": int(last.forget.sum()), "klom95": report["klom95"],
               "unlearned": report["models"]["unlearned"], "oracle": report["models"]["oracle"],
               "bench_seconds": round(time.perf_counter() - t0, 1)}
        results["runs"].append(row)
        print_row(row)
        out.write_text(json.dumps(results, indent=1))
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results, indent=1))
    return results


def print_row(row: dict) -> None:
    def cell(name: str) -> str:
        entry = row["klom95"][name]
        return f"{entry['unlearned']:.2f} ({entry['floor']:.2f}|{entry['original']:.2f})"

    u, o = row["unlearned"], row["oracle"]
    print(f"{row['requests']:>8} {row['forget_rows']:>6} {cell('forget'):>20} {cell('retain'):>20} "
          f"{cell('test'):>20} {u['forget_accuracy']:.3f}/{o['forget_accuracy']:.3f} {u['test_accuracy']:.3f}/"
          f"{o['test_accuracy']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "mnist5k"], default="digits")
    parser.add_argument("--arch", default="mlp", help="a registry architecture: mlp, cnn, resnet20")
    parser.add_argument("--arch-args", type=json.loads, help='its args as JSON (mlp default: {"hidden": [128]})')
    parser.add_argument("--epochs", type=int, help="the original training recipe's epochs (default: train's 30)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--attribution-models", type=int, default=PARAMS["dmm"]().attribution_models)
    parser.add_argument("--retain-multiple", type=int, help="dmm's retain_multiple (default: dmm's default)")
    parser.add_argument("--min-retain-rows", type=int, help="dmm's min_retain_rows (default: dmm's default)")
    parser.add_argument("--attribution-cache", type=Path, help="an .npz to keep the datamodel in between runs")
    parser.add_argument("--out", default="unlearn_chain.json", help="file name under bench/results/")
    args = parser.parse_args()
    print("KLoM95 cells: unlearned (oracle-vs-oracle floor | do-nothing original); accuracy: unlearned/oracle\n"
          f"{'requests':>8} {'rows':>6} {'KLoM95 forget':>20} {'retain':>20} {'test':>20} {'forget acc':>11} "
          f"{'test acc':>11}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    overrides = {name: value for name, value in (("retain_multiple", args.retain_multiple),
                                                 ("min_retain_rows", args.min_retain_rows)) if value is not None}
    run(args.k, args.requests, args.attribution_models, RESULTS / Path(args.out).name, overrides,
        args.attribution_cache, args.dataset, recipe_from_args(args.arch, args.arch_args, args.epochs))


if __name__ == "__main__":
    main()
