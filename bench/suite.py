"""The benchmark suite's frame (issue 12): sizes, interleaved repetitions, one row per figure with the platform's
number, the baseline's number from the same run, their ratio and spread, the machine; summary.json and summary.md."""
import contextlib
import json
import os
import platform as py_platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Size:
    """How much each figure measures. `smoke` only proves the suite runs (the test suite's check)."""
    name: str
    repeats: int
    train_epochs: int  # P1
    kd_epochs: int  # P2
    submits: int  # P3, per repetition
    poll_seconds: float  # P4, per repetition and client count
    download_mb: int  # P5
    ledger_sizes: tuple[int, ...]  # P6 jobs
    queued_sizes: tuple[int, int]  # P6 dispatch
    events_sizes: tuple[int, int]  # P6 events per job
    warm_up: bool = True  # a first job before timing (worker imports, first ONNX export); smoke skips it


SIZES = {
    "smoke": Size("smoke", 1, 1, 1, 1, 0.5, 8, (1_000, 5_000), (10, 1_000), (1_000, 5_000), warm_up=False),
    "quick": Size("quick", 5, 3, 2, 5, 2.0, 200, (1_000, 10_000, 100_000), (10, 10_000), (1_000, 100_000)),
    "full": Size("full", 5, 20, 5, 30, 6.0, 200, (1_000, 100_000, 1_000_000), (10, 10_000), (1_000, 100_000)),
}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


@dataclass
class Row:
    """One figure. `ratio` is platform / baseline of the medians; `goal` says which way is better."""
    id: str
    figure: str
    unit: str
    goal: str
    platform: dict
    baseline: dict
    baseline_name: str
    ratio: float | None = None
    note: str = ""
    skipped: str = ""  # why the row has no numbers
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ratio is None and self.platform and self.baseline and self.baseline["median"]:
            self.ratio = self.platform["median"] / self.baseline["median"]


def row(id_: str, figure: str, unit: str, goal: str, platform: list[float], baseline: list[float],
        baseline_name: str, **extra) -> Row:
    return Row(id_, figure, unit, goal, spread(platform), spread(baseline), baseline_name, **extra)


def skipped(id_: str, figure: str, why: str) -> Row:
    return Row(id_, figure, "", "", {}, {}, "", skipped=why)


def interleaved(repeats: int, platform: Callable[[int], float], baseline: Callable[[int], float]
                ) -> tuple[list[float], list[float]]:
    """Platform and baseline alternate, the order swapped every repetition, so drift (thermal, a neighbour's load)
    lands on both sides."""
    ours, theirs = [], []
    for rep in range(repeats):
        if rep % 2 == 0:
            ours.append(platform(rep))
            theirs.append(baseline(rep))
        else:
            theirs.append(baseline(rep))
            ours.append(platform(rep))
    return ours, theirs


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), py_platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpus": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
            "python": py_platform.python_version(), "os": py_platform.platform(),
            "load_average_at_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"Measured by `{summary['command']}` "
             f"on {m['cpus']} × {m['cpu_model']}, torch {m['torch']}, Python {m['python']} "
             f"(load average at start {m['load_average_at_start'][0]:.1f}); {summary['repeats']} interleaved "
             "repetition(s) per figure, platform and baseline alternating. Ratio = platform / baseline (medians).", "",
             "| id | figure | unit | platform (median; min–max) | baseline (median; min–max) | ratio | goal |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if r["skipped"]:
            lines.append(f"| {r['id']} | {r['figure']} | | skipped: {r['skipped']} | | | |")
            continue
        p, b = r["platform"], r["baseline"]
        lines.append(f"| {r['id']} | {r['figure']} | {r['unit']} | {_cell(p['median'])} ({_cell(p['min'])}–"
                     f"{_cell(p['max'])}) | {r['baseline_name']}: {_cell(b['median'])} ({_cell(b['min'])}–"
                     f"{_cell(b['max'])}) | {_cell(r['ratio'])}× | {r['goal']} |")
    notes = [f"- {r['id']} {r['figure']}: {r['note']}" for r in summary["rows"] if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(results: Path, size: Size, rows: list[Row], machine_info: dict, started: float,
          name: str = "summary", command: str = "python -m bench.run_all") -> dict:
    command += "" if size.name == "full" else f" --{size.name}"
    summary = {"command": command, "size": size.name, "repeats": size.repeats, "machine": machine_info,
               "seconds": round(time.time() - started, 1), "sizes": asdict(size), "rows": [asdict(r) for r in rows]}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (results / f"{name}.md").write_text(markdown(summary))
    return summary


@contextlib.contextmanager
def environ(**values: str):
    """Set environment variables for the child processes started inside (bare servers and workers read them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
