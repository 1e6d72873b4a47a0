"""The polling path against real processes: conditional GET (ETag → 304), the long-poll (`?wait=N`) and its place
outside the admission gate, the SDK's wait on top of it, the auth cache (a revoked key is refused once its TTL is
over), one rate-limit budget per key shared by several API processes through Redis (`refinery api` with
REFINERY_API_PROCESSES=2 beside a plain uvicorn process, on one Postgres and one Redis), and the ledger's list
filters in SQL (the same answers on Postgres and SQLite, and an index scan on Postgres)."""
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert, text
from sqlalchemy.dialects import postgresql

from client.sdk import Refinery
from db.migrate import upgrade
from db.models import Job
from db.repositories import jobs as job_repo
from db.repositories.projects import create_key, get_or_create_project, revoke_key
from db.session import transaction
from tests.conftest import REDIS_URL, ROOT, TOKEN, free_port, fresh_database

RATE_PER_MINUTE = 120
AUTH_CACHE_SECONDS = 2.0


class TwoApis:
    """`refinery api` with two uvicorn workers (port a) and a plain uvicorn process (port b) on one fresh Postgres
    database and the test Redis; no Celery worker, so jobs stay queued until the test changes them."""

    def __init__(self, url: str, home: Path):
        self.url, self.home = url, home
        self.port_a, self.port_b = free_port(), free_port()
        self.env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=url, REFINERY_BROKER_URL=REDIS_URL,
                        REFINERY_QUEUE=f"refinery.polling.{uuid.uuid4().hex[:8]}",
                        REFINERY_STORAGE_URL=f"file://{home / 'store'}", REFINERY_BOOTSTRAP_TOKEN=TOKEN,
                        REFINERY_RATE_LIMIT_PER_MINUTE=str(RATE_PER_MINUTE),
                        REFINERY_AUTH_CACHE_SECONDS=str(AUTH_CACHE_SECONDS), REFINERY_RUN_WEBHOOK_SENDER="false",
                        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        refinery = str(Path(sys.executable).parent / "refinery")
        self.procs = [
            self._spawn([refinery, "api", "--host", "127.0.0.1", "--port", str(self.port_a)],
                        {"REFINERY_API_PROCESSES": "2"}, "api-a.log"),
            # Two places in its admission gate: the long-poll test fills them many times over.
            self._spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                         str(self.port_b), "--log-level", "warning"], {"REFINERY_API_CONCURRENCY": "2"}, "api-b.log")]
        self.a, self.b = f"http://127.0.0.1:{self.port_a}", f"http://127.0.0.1:{self.port_b}"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.time() + 90
        for base in (self.a, self.b):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/v1/methods", headers=self.headers, timeout=2).status_code == 200:
                        break
                if time.time() > deadline:
                    raise RuntimeError("APIs did not start: " + (home / "api-a.log").read_text()[-2000:]
                                       + (home / "api-b.log").read_text()[-2000:])
                time.sleep(0.3)

    def _spawn(self, args: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen:
        log = open(self.home / log_name, "ab")
        return subprocess.Popen(args, env={**self.env, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def submit(self) -> dict:
        r = httpx.post(self.b + "/v1/jobs", headers=self.headers, json={
            "method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 1}})
        assert r.status_code == 201, r.text
        return r.json()

    def new_key(self, project: str = "polling") -> str:
        with transaction(self.url) as session:
            _, key = create_key(session, get_or_create_project(session, project), name="polling-test")
        return key


@pytest.fixture(scope="module")
def apis(tmp_path_factory, redis_client):
    with fresh_database() as url:
        pair = TwoApis(url, tmp_path_factory.mktemp("polling-home"))
        try:
            yield pair
        finally:
            pair.stop()
            redis_client.delete(pair.env["REFINERY_QUEUE"])


def test_conditional_get_answers_304_with_no_body_while_the_job_is_unchanged(apis):
    job = apis.submit()
    first = httpx.get(f"{apis.b}/v1/jobs/{job['id']}", headers=apis.headers)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.json() == job and etag.startswith('"')
    for base in (apis.a, apis.b):  # every process computes the same validator for the same job
        again = httpx.get(f"{base}/v1/jobs/{job['id']}", headers={**apis.headers, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    weak_or_listed = httpx.get(f"{apis.b}/v1/jobs/{job['id']}",
                               headers={**apis.headers, "If-None-Match": f'"stale", W/{etag}'})
    assert weak_or_listed.status_code == 304
    stale = httpx.get(f"{apis.b}/v1/jobs/{job['id']}", headers={**apis.headers, "If-None-Match": '"stale"'})
    assert stale.status_code == 200 and stale.headers["etag"] == etag
    assert httpx.post(f"{apis.b}/v1/jobs/{job['id']}/cancel", headers=apis.headers).status_code == 200
    changed = httpx.get(f"{apis.b}/v1/jobs/{job['id']}", headers={**apis.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled" and changed.headers["etag"] != etag


def test_long_poll_returns_when_the_job_changes_or_the_wait_ends(apis):
    job = apis.submit()
    url = f"{apis.b}/v1/jobs/{job['id']}"
    etag = httpx.get(url, headers=apis.headers).headers["etag"]
    held = {**apis.headers, "If-None-Match": etag}
    started = time.monotonic()
    unchanged = httpx.get(url, params={"wait": 1}, headers=held)
    assert unchanged.status_code == 304 and time.monotonic() - started >= 0.9
    no_etag = httpx.get(url, params={"wait": 0.5}, headers=apis.headers)
    assert no_etag.status_code == 200 and no_etag.headers["etag"] == etag  # unchanged: the body, at the end
    assert httpx.get(url, params={"wait": 20}, headers={**apis.headers, "If-None-Match": '"old"'}).status_code == 200

    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(httpx.get, url, params={"wait": 20}, headers=held, timeout=30)
        waiting_bare = pool.submit(httpx.get, url, params={"wait": 20}, headers=apis.headers, timeout=30)
        time.sleep(0.8)
        assert not waiting.done() and not waiting_bare.done()
        started = time.monotonic()
        assert httpx.post(f"{url}/cancel", headers=apis.headers).status_code == 200
        changed, changed_bare = waiting.result(), waiting_bare.result()
        answered_after = time.monotonic() - started
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed_bare.status_code == 200 and changed_bare.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag and answered_after < 5  # the change, not the 20 s wait, ended them
    for bad in ("0", "61", "soon"):
        assert httpx.get(url, params={"wait": bad}, headers=apis.headers).status_code == 422
    other = {"Authorization": f"Bearer {apis.new_key('polling-other')}"}
    assert httpx.get(url, params={"wait": 5}, headers=other).status_code == 404  # at once, like any other 404


def test_waiting_long_polls_hold_no_place_in_the_admission_gate(apis):
    """Process b admits two requests at a time; eight long-polls waiting there leave room for a plain GET."""
    job = apis.submit()
    url = f"{apis.b}/v1/jobs/{job['id']}"
    held = {**apis.headers, "If-None-Match": httpx.get(url, headers=apis.headers).headers["etag"]}
    with ThreadPoolExecutor(8) as pool:
        polls = [pool.submit(httpx.get, url, params={"wait": 4}, headers=held, timeout=30) for _ in range(8)]
        time.sleep(1.0)
        plain = httpx.get(url, headers=apis.headers, timeout=30)
        assert plain.status_code == 200 and not any(p.done() for p in polls)
        assert [p.result().status_code for p in polls] == [304] * 8


def test_sdk_wait_long_polls_one_request_per_change(apis):
    job = apis.submit()
    client = Refinery(apis.b, api_key=TOKEN)
    requests: list[str] = []
    client.http.event_hooks["request"].append(lambda request: requests.append(str(request.url)))
    threading.Timer(2.5, lambda: httpx.post(f"{apis.b}/v1/jobs/{job['id']}/cancel", headers=apis.headers)).start()
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "cancelled"
    assert len(requests) == 2 and "wait=30" in requests[1]  # a read, then one long-poll that the cancel ended
    requests.clear()
    still = client.wait(apis.submit()["id"], timeout=1.0)  # the timeout bounds the long-poll too
    assert still["status"] == "queued" and len(requests) == 2


def test_a_cached_key_is_refused_once_the_cache_ttl_after_its_revocation_is_over(apis):
    key = apis.new_key()
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(apis.b + "/v1/jobs", headers=headers).status_code == 200
    with transaction(apis.url) as session:
        assert revoke_key(session, key)
    revoked_at = time.monotonic()
    # Within the TTL the process that checked the key still trusts it: that is the cache at work.
    assert httpx.get(apis.b + "/v1/jobs", headers=headers).status_code == 200
    assert time.monotonic() - revoked_at < AUTH_CACHE_SECONDS
    time.sleep(AUTH_CACHE_SECONDS + 0.2 - (time.monotonic() - revoked_at))
    for base in (apis.a, apis.b):
        refused = httpx.get(base + "/v1/jobs", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_api_processes_share_one_rate_limit_budget_per_key_through_redis(apis):
    """A burst of 200 requests, alternating between process a (two uvicorn workers) and process b: per-process
    buckets would let all 200 through; one bucket in Redis lets the key's 120 (plus the ~2/s refill) through."""
    headers = {"Authorization": f"Bearer {apis.new_key()}"}
    bases = [apis.a, apis.b] * 100
    clients = {base: httpx.Client(base_url=base, headers=headers, timeout=30) for base in (apis.a, apis.b)}

    def get(base: str) -> tuple[str, int]:
        return base, clients[base].get("/v1/jobs", params={"limit": 1}).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(get, bases))
    for client in clients.values():
        client.close()
    refill = 2 + (time.monotonic() - started) * RATE_PER_MINUTE / 60
    ok = sum(status == 200 for _, status in outcomes)
    assert {status for _, status in outcomes} == {200, 429}
    print(f"{ok} of 200 allowed in {time.monotonic() - started:.2f} s")
    assert RATE_PER_MINUTE <= ok <= RATE_PER_MINUTE + refill, (ok, refill)
    assert {base for base, status in outcomes if status == 429} == {apis.a, apis.b}  # both refused: one budget


# --- the ledger's list filters in SQL ---

def _synthetic_jobs(project_id: str, count: int) -> list[dict]:
    """Jobs in the ratios of a busy ledger: almost all finished, a few running, one method rare, metadata on some.
    (For a common value the planner rightly walks the primary key backwards and filters: as cheap, with LIMIT.)"""
    rows = []
    for i in range(count):
        status = "running" if i % 100 == 0 else ("failed" if i % 10 == 1 else "succeeded")
        rows.append({"id": f"job_{i:08d}", "project_id": project_id, "status": status,
                     "method": "unlearn" if i % 100 == 5 else ("train", "distill", "prune")[i % 3],
                     "algorithm": "default", "spec": {},
                     "metadata_": {"team": f"t{i % 7}", **({"sweep": "lr"} if i % 3 == 0 else {})},
                     "created_at": 1.7e9 + i, "attempt": 1, "max_attempts": 3, "cancel_requested": False,
                     "progress": {}, "max_seconds": 600, "used_seconds": 0.0})
    return rows


def _every_page(session, project_id: str, **filters) -> list[str]:
    ids, after = [], None
    while True:
        page, has_more = job_repo.list_jobs(session, project_id, after=after, limit=50, **filters)
        ids += [j.id for j in page]
        if not has_more:
            return ids
        after = page[-1].id


def _expected(rows: list[dict], status=None, method=None, metadata=None) -> list[str]:
    """The filters as the API used to apply them: in Python, over every row."""
    return sorted((r["id"] for r in rows if (status is None or r["status"] == status)
                   and (method is None or r["method"] == method)
                   and all(r["metadata_"].get(k) == v for k, v in (metadata or {}).items())), reverse=True)


FILTERS = [dict(status="failed", method=None, metadata={}),
           dict(status=None, method="prune", metadata={"team": "t3"}),
           dict(status="succeeded", method="train", metadata={"team": "t1", "sweep": "lr"}),
           dict(status=None, method=None, metadata={"sweep": "none-such"})]


def _check_filters(url: str, count: int) -> list[dict]:
    with transaction(url) as session:
        project = get_or_create_project(session, "ledger-scale")
        project_id = project.id
        other = get_or_create_project(session, "ledger-scale-other")
        rows = _synthetic_jobs(project_id, count)
        session.execute(insert(Job), rows)  # one executemany
        session.execute(insert(Job), [{**r, "id": r["id"] + "x", "project_id": other.id} for r in rows[:50]])
    with transaction(url) as session:
        for filters in FILTERS:
            assert _every_page(session, project_id, **filters) == _expected(rows, **filters), filters
    return rows


def test_list_filters_run_in_sql_with_an_index_per_filter_on_postgres():
    with fresh_database() as url:
        rows = _check_filters(url, 20_000)
        project_id = rows[0]["project_id"]
        with transaction(url) as session:
            session.execute(text("ANALYZE jobs"))
            plans = {}
            for name, filters in (("status", dict(status="running", method=None)),
                                  ("method", dict(status=None, method="unlearn"))):
                query = job_repo.list_query(project_id, after="job_00015000", limit=20, metadata={}, **filters)
                sql = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
                plans[name] = "\n".join(r[0] for r in session.execute(text(f"EXPLAIN {sql}")))
    assert "ix_jobs_project_status_id" in plans["status"], plans["status"]
    assert "ix_jobs_project_method_id" in plans["method"], plans["method"]  # a rare method, like the status


def test_list_filters_give_the_same_answers_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)  # migration 0004 on SQLite too
    _check_filters(url, 2_000)
