"""Dashboard latency in headless Chromium against the embedded platform (`refinery serve`: SQLite, a solo worker):
page loads of /ui/jobs (a full page of 20 rows) and of a finished job's page (curves, confusion matrix, artifacts),
from the browser's navigation timing, as ratios to a bare static page served by the same server
(api/ui/static/blank.html: the same stylesheet and scripts, no data); and how long after
a status change in the ledger the open job page shows it (no reload: the SSE stream plus one state fetch).

    .venv/bin/python bench/ui_latency.py [--runs 7] [--jobs 4]
"""
import argparse
import json
import statistics
import tempfile
import time

import httpx

from bench.common import RESULTS, served, wait_job

# Navigation timing: `load` is request start to the end of the load event (scripts run, charts drawn), `response`
# request start to the last byte of the HTML.
TIMING = """
const t = performance.getEntriesByType("navigation")[0];
return {load: t.loadEventEnd - t.startTime, response: t.responseEnd - t.requestStart};
"""


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", f"--user-data-dir={tempfile.mkdtemp(prefix='refinery-bench-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def page_load(driver, url: str, runs: int) -> dict:
    driver.get(url)  # once to warm the cache (static files), as a returning user has it
    samples = []
    for _ in range(runs):
        driver.get(url)
        samples.append(driver.execute_script(TIMING))
    return {"runs": runs, "load_ms_median": statistics.median(s["load"] for s in samples),
            "response_ms_median": statistics.median(s["response"] for s in samples)}


def status_latency(driver, base: str, headers: dict, spec: dict) -> dict:
    """Open a fresh job's page at once, wait for it to show `succeeded`; compare when the page showed each status
    with when the ledger changed it (started_at: queued → running; finished_at: → succeeded)."""
    from selenium.webdriver.support.ui import WebDriverWait

    job = httpx.post(f"{base}/v1/jobs", headers=headers, json=spec, timeout=30).json()
    driver.get(f"{base}/ui/jobs/{job['id']}")
    WebDriverWait(driver, 120, poll_frequency=0.05).until(
        lambda d: d.execute_script("return document.getElementById('job-status').textContent") == "succeeded")
    shown = driver.execute_script("return window.refinery")
    ledger = wait_job(base, headers, job["id"])
    result = {"succeeded_s": shown["statusShownAt"]["succeeded"] / 1000 - ledger["finished_at"]}
    if shown["statusHistory"][0] == "queued" and "running" in shown["statusShownAt"]:
        result["running_s"] = shown["statusShownAt"]["running"] / 1000 - ledger["started_at"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7, help="page loads per page")
    parser.add_argument("--jobs", type=int, default=4, help="jobs watched for the status latency")
    args = parser.parse_args()
    spec = {"method": "train", "model": {"arch": "mlp"}, "dataset": {"uri": "builtin://digits"},
            "params": {"epochs": 4}, "budget": {"max_seconds": 120}}
    with served({"REFINERY_RATE_LIMIT_PER_MINUTE": "1000000"}) as platform:
        base, headers = platform.base, platform.headers
        finished = wait_job(base, headers, httpx.post(f"{base}/v1/jobs", headers=headers, json=spec).json()["id"])
        for _ in range(19):  # a full page of rows: cancelled before they start, so nothing else runs
            queued = httpx.post(f"{base}/v1/jobs", headers=headers, json=spec).json()
            httpx.post(f"{base}/v1/jobs/{queued['id']}/cancel", headers=headers)
        driver = chromium()
        try:
            driver.get(base + "/ui/login")
            driver.find_element("id", "key").send_keys(headers["Authorization"].split()[1])
            driver.find_element("css selector", "form[action='/ui/login'] button").click()
            pages = {"static page (baseline)": page_load(driver, base + "/ui/static/blank.html", args.runs),
                     "/ui/jobs (20 rows)": page_load(driver, base + "/ui/jobs", args.runs),
                     "/ui/jobs/{id} (finished train job)": page_load(driver, f"{base}/ui/jobs/{finished['id']}",
                                                                     args.runs)}
            latencies = [status_latency(driver, base, headers, spec) for _ in range(args.jobs)]
        finally:
            driver.quit()
    baseline = pages["static page (baseline)"]
    for timing in pages.values():
        timing["load_ratio"] = timing["load_ms_median"] / baseline["load_ms_median"]
        timing["response_ratio"] = timing["response_ms_median"] / baseline["response_ms_median"]
    sse = {"jobs": args.jobs, "succeeded_s_median": statistics.median(r["succeeded_s"] for r in latencies),
           "samples": latencies}
    running = [r["running_s"] for r in latencies if "running_s" in r]
    if running:
        sse["running_s_median"] = statistics.median(running)
    summary = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shape": "embedded (SQLite, filesystem broker)",
               "browser": "headless Chromium, warm cache", "page_loads": pages, "status_latency": sse,
               "note": "the stream polls the ledger every 0.5 s (api/jobs/router.py _stream_events); the page then "
                       "fetches the job's state once"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ui_latency.json").write_text(json.dumps(summary, indent=2))
    for name, t in pages.items():
        print(f"{name:38s} load {t['load_ms_median']:7.1f} ms (×{t['load_ratio']:.1f})  "
              f"response {t['response_ms_median']:6.1f} ms (×{t['response_ratio']:.1f})")
    print(f"status change in the ledger → shown on the open page: succeeded median {sse['succeeded_s_median']:.3f} s"
          + (f", running median {sse['running_s_median']:.3f} s ({len(running)} of {args.jobs})" if running else ""))


if __name__ == "__main__":
    main()
