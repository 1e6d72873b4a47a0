"""Run every bench script in turn (`make bench`); each prints its table and writes bench/results/<name>.json."""
import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
for script in sorted(here.glob("*.py")):
    if script.stem in ("__init__", "common", "services", "distill_common", "bare_app", "run_all"):
        continue
    print(f"== {script.name}", flush=True)
    subprocess.run([sys.executable, "-m", f"bench.{script.stem}"], cwd=here.parent, check=False)
