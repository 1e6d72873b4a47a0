"""The benchmark suite works end to end (`python -m bench.run_all --smoke`: one repetition, the smallest sizes) and
writes every figure's row with numbers and a ratio. No timing thresholds: timings belong in bench/, not here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"P1": 2, "P2": 1, "P3": 4, "P4": 6, "P5": 2, "P6": 5}


def test_the_suite_writes_every_row_with_numbers_and_ratios(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", "--results", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["size"] == "smoke" and summary["machine"]["cpus"] >= 1 and summary["machine"]["torch"]
    counts = {figure: sum(r["id"] == figure for r in summary["rows"]) for figure in FIGURES}
    assert counts == FIGURES
    for r in summary["rows"]:
        if r["skipped"]:  # only P5, when nginx is missing, and it says why
            assert r["id"] == "P5" and "nginx" in r["skipped"]
            continue
        for side in ("platform", "baseline"):
            assert r[side]["min"] <= r[side]["median"] <= r[side]["max"], r
            assert len(r[side]["values"]) == summary["repeats"]
        if r["id"] == "P5" and "RSS" in r["figure"]:
            continue  # a growth over a baseline that can be 0 MB has no ratio
        assert r["ratio"] is not None and r["ratio"] > 0, r
    table = (tmp_path / "summary.md").read_text()
    assert table.count("\n| P") == len(summary["rows"])


def test_readme_table_prints_summary_md(tmp_path):
    (tmp_path / "summary.md").write_text("| id |\n")
    out = subprocess.run([sys.executable, "-m", "bench.readme_table", "--results", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == "| id |\n"
