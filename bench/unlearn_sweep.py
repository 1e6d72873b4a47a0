"""Sweep dmm's matching recipe on one model, with everything that does not depend on the recipe trained once and
cached: the datamodel (bench/unlearn_klom.py's fit), the K re-trained originals (their weights) and the 2K oracles
(their logits). Each variant then costs only K unlearning runs, so a recipe can be tuned on a convnet in minutes
instead of the ~30 a fresh bench/unlearn_klom.py run takes. The KLoM report is the job's own (oracles.klom_report).

    .venv/bin/python bench/unlearn_sweep.py --dataset mnist5k --arch cnn --epochs 15 --k 8 --scenario random \
        --cache /tmp/sweep-cnn --variants '[{}, {"lr": 5e-4}]' --out unlearn_sweep_cnn.json

A variant is dmm's params as JSON. Writes bench/results/<out>."""
import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench.unlearn_klom import RESULTS, SEED, attribution_size, builtin_split, cached_attribution, forget_mask  # noqa: E402
from core.methods.train import TrainParams  # noqa: E402
from workers.unlearning.algorithms import PARAMS, match_rows  # noqa: E402
from workers.unlearning.ensemble import Shared, Trained, _logits, unlearn, usable_cpus  # noqa: E402
from workers.unlearning.fitting import Deadline, Fitting, Recipe, fresh_model, run_to_end  # noqa: E402
from workers.unlearning.oracles import klom_report, seed_for  # noqa: E402

_shared: Shared | None = None


def _start(shared: Shared) -> None:
    global _shared
    torch.set_num_threads(1)
    _shared = shared


def _train(job: tuple[str, int, str]) -> tuple[str, int, np.ndarray, np.ndarray, float]:
    """Train one original (all rows, weights saved to `path`) or oracle (retain rows); return its logits."""
    role, seed, path = job
    s = _shared
    rows = np.ones(len(s.train), dtype=bool) if role == "original" else ~s.forget
    data = s.train.subset(rows)
    started = time.perf_counter()
    model = fresh_model(s.recipe, data, seed)
    fitting = Fitting(model, s.recipe.params, torch.from_numpy(data.x).float(), torch.from_numpy(data.y).long(),
                      torch.from_numpy(s.test.x).float(), torch.from_numpy(s.test.y).long(), seed)
    model = run_to_end(fitting, Deadline(s.deadline))
    if role == "original":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return (role, seed, *_logits(model, s), time.perf_counter() - started)


def _unlearn(job: tuple[int, str]) -> tuple[np.ndarray, np.ndarray, float]:
    seed, path = job
    s = _shared
    model = fresh_model(s.recipe, s.train, seed)
    model.load_state_dict(load_file(path))
    model.eval()
    started = time.perf_counter()
    unlearned = unlearn(model, s, seed, Deadline(s.deadline))
    return (*_logits(unlearned, s), time.perf_counter() - started)


def pool(shared: Shared):
    return multiprocessing.get_context("spawn").Pool(usable_cpus(), initializer=_start, initargs=(shared,))


def trained_models(shared: Shared, k: int, cache: Path) -> tuple[list[Trained], list[Trained], list[str]]:
    """The K originals and 2K oracles the evaluation compares, trained once per cache directory."""
    store = cache / "models.npz"
    paths = [str(cache / f"original-{i}.safetensors") for i in range(k)]
    if not store.exists():
        jobs = [job for i in range(k) for job in (("original", seed_for("original", SEED, i), paths[i]),
                                                  ("oracle", seed_for("oracle", SEED, 2 * i), ""),
                                                  ("oracle", seed_for("oracle", SEED, 2 * i + 1), ""))]
        with pool(shared) as workers:
            done = workers.map(_train, jobs)
        np.savez(store, **{f"{role}-{seed}-{part}": value for role, seed, train, test, seconds in done
                           for part, value in (("train", train), ("test", test), ("seconds", seconds))})
    stored = np.load(store)
    seeds = {role: sorted({int(name.split("-")[1]) for name in stored.files if name.startswith(role)})
             for role in ("original", "oracle")}

    def load(role: str, seed: int) -> Trained:
        return Trained(role, seed, stored[f"{role}-{seed}-train"], stored[f"{role}-{seed}-test"],
                       float(stored[f"{role}-{seed}-seconds"]))

    return ([load("original", s) for s in seeds["original"]], [load("oracle", s) for s in seeds["oracle"]], paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--arch-args", type=json.loads, default={})
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--scenario", choices=["random", "class"], default="random")
    parser.add_argument("--attribution-models", type=int, default=64)
    parser.add_argument("--cache", type=Path, required=True, help="directory for the attribution and the models")
    parser.add_argument("--variants", type=json.loads, default=[{}], help="a JSON list of dmm params")
    parser.add_argument("--out", default="unlearn_sweep.json")
    args = parser.parse_args()
    train, test = builtin_split(args.dataset)
    recipe = Recipe(args.arch, args.arch_args, TrainParams(epochs=args.epochs))
    base = Shared(train, test, np.zeros(len(train), dtype=bool), recipe, time.time() + 24 * 3600)
    args.cache.mkdir(parents=True, exist_ok=True)
    fitted, seconds = cached_attribution(base, attribution_size(args.attribution_models, len(train)),
                                         args.cache / "attribution.npz")
    print(f"attribution: {seconds:.0f} s", flush=True)
    forget, forget_class = forget_mask(train, args.scenario)
    shared = replace(base, forget=forget)
    models_dir = args.cache / args.scenario
    models_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    originals, oracles, paths = trained_models(shared, args.k, models_dir)
    print(f"originals and oracles: {time.perf_counter() - started:.0f} s", flush=True)
    out = RESULTS / Path(args.out).name
    results = {"setting": vars(args) | {"cache": str(args.cache)}, "runs": []}
    for variant in args.variants:
        params = PARAMS["dmm"](**variant)
        match = match_rows(forget, params.retain_multiple, SEED)
        shift = fitted.predicted_shift(train.y, forget, len(train.classes))[match]
        run = replace(shared, algorithm="dmm", params=params.model_dump(mode="json"), match=match, match_shift=shift)
        started = time.perf_counter()
        with pool(run) as workers:
            done = workers.map(_unlearn, [(t.seed, path) for t, path in zip(originals, paths, strict=True)])
        for t, (train_logits, test_logits, seconds) in zip(originals, done, strict=True):
            t.unlearned_train_logits, t.unlearned_test_logits, t.unlearn_seconds = train_logits, test_logits, seconds
        report = klom_report(run, args.k, originals, oracles, forget_class)
        row = {"variant": variant, "klom95": report["klom95"], **report["models"],
               "seconds": round(time.perf_counter() - started, 1)}
        results["runs"].append(row)
        cells = " ".join(f"{name} {v['unlearned']:.2f} ({v['floor']:.2f}|{v['original']:.2f})"
                         for name, v in report["klom95"].items())
        u = row["unlearned"]
        print(f"{json.dumps(variant)}: {cells}  acc F/R/T {u['forget_accuracy']:.3f}/{u['retain_accuracy']:.3f}/"
              f"{u['test_accuracy']:.3f}  {row['seconds']} s", flush=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
