"""Signed webhooks on real components: receivers are HTTP servers on loopback started here, the platform is the real
API and Celery worker on Postgres, signatures are checked with hmac/hashlib/base64 written here (not with the
signing library). A train job's transitions arrive in order and signed; a failing receiver is retried with the same
webhook-id; a hanging one delays nothing else; a SIGKILLed sender loses no delivery; SSRF is refused at creation and
at every send; an endpoint is disabled after its last failed try; rotated secrets, other projects, the CLI."""
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from bench.common import WebhookReceiver as Receiver
from tests.conftest import ROOT, Platform, free_port, fresh_database

TRAIN = {"method": "train", "model": {"arch": "mlp"}, "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 3},
         "budget": {"max_seconds": 120}, "seed": 0}


def signature_valid(secret: str, request: dict) -> bool:
    """Standard Webhooks, by hand: base64 HMAC-SHA256 of "id.timestamp.body" under the base64 key after whsec_."""
    headers = request["headers"]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(hmac.compare_digest(s, f"v1,{expected}") for s in headers["webhook-signature"].split())


def create(platform, url: str, **body) -> dict:
    r = platform.http.post("/v1/webhooks", json={"url": url, **body})
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(platform, webhook_id: str) -> list[dict]:
    r = platform.http.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def wait_delivery(platform, webhook_id: str, delivery_id: str, until=("delivered", "failed"), timeout=30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [d for d in deliveries(platform, webhook_id) if d["id"] == delivery_id]
        if found and found[0]["status"] in until:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"delivery {delivery_id} still {found}")


@pytest.fixture(scope="module", autouse=True)
def no_webhooks_left(platform):
    """The platform is shared with other modules: their jobs should not feed this module's endpoints."""
    yield
    for hook in platform.http.get("/v1/webhooks", params={"limit": 100}).json()["data"]:
        platform.http.delete(f"/v1/webhooks/{hook['id']}")


@pytest.fixture(scope="module")
def train_run(platform):
    """One real train job watched by two endpoints: one that answers at once, one that hangs past every timeout."""
    good = Receiver()
    release = threading.Event()
    hanging = Receiver(lambda n, request: 200 if release.wait(60) else 503)
    hook = create(platform, good.url, description="records everything")
    slow = create(platform, hanging.url, event_types=["job.queued", "job.running", "job.succeeded"])
    submitted = platform.submit(TRAIN)
    final = platform.wait(submitted["id"], timeout=120)
    slow_at_finish = deliveries(platform, slow["id"])
    good.wait_for(3)
    yield {"good": good, "hanging": hanging, "hook": hook, "slow": slow, "submitted": submitted, "final": final,
           "slow_at_finish": slow_at_finish}
    release.set()
    for receiver in (good, hanging):
        receiver.close()
    for webhook in (hook, slow):
        platform.http.delete(f"/v1/webhooks/{webhook['id']}")


def test_a_train_jobs_transitions_arrive_in_order_signed_with_the_job_object(platform, train_run):
    final, submitted, secret = train_run["final"], train_run["submitted"], train_run["hook"]["secret"]
    assert final["status"] == "succeeded", final["error"]
    requests = [r for r in train_run["good"].requests if json.loads(r["body"])["data"].get("id") == final["id"]]
    events = [json.loads(r["body"]) for r in requests]
    assert [e["type"] for e in events] == ["job.queued", "job.running", "job.succeeded"]
    assert all(signature_valid(secret, r) for r in requests)
    assert len({r["headers"]["webhook-id"] for r in requests}) == 3
    assert all(r["headers"]["webhook-id"].startswith("msg_") for r in requests)
    assert all(r["headers"]["content-type"] == "application/json" for r in requests)
    queued, running, succeeded = (e["data"] for e in events)
    # The POST's answer is the job as it was when queued, less `waiting_for`: that is the API's live read of the
    # worker registry at request time (a worker still busy with the last test's job shows as worker_busy), while a
    # webhook carries the ledger's record, which never has it.
    assert queued["waiting_for"] is None
    assert {k: v for k, v in queued.items() if k != "waiting_for"} == \
        {k: v for k, v in submitted.items() if k != "waiting_for"}
    assert succeeded == final  # what GET /v1/jobs/{id} returns now that it is done
    assert running["status"] == "running" and running["finished_at"] is None
    assert {k: running[k] for k in ("id", "spec", "created_at", "started_at", "attempt")} == \
        {k: final[k] for k in ("id", "spec", "created_at", "started_at", "attempt")}
    assert events[0]["timestamp"] <= events[1]["timestamp"] <= events[2]["timestamp"]
    listed = {d["id"]: d for d in deliveries(platform, train_run["hook"]["id"])}
    for request in requests:
        d = listed[request["headers"]["webhook-id"]]
        assert d["status"] == "delivered" and d["attempts"] == 1 and d["last_status_code"] == 200
        assert d["job_id"] == final["id"] and d["delivered_at"] >= d["created_at"] and d["last_latency_ms"] >= 0


def test_a_hanging_receiver_delays_neither_the_job_nor_other_endpoints(platform, train_run):
    final, slow = train_run["final"], train_run["slow"]
    assert final["status"] == "succeeded"
    # When the job had finished, the hanging endpoint's first delivery was still being tried.
    queued = [d for d in train_run["slow_at_finish"] if d["event_type"] == "job.queued"]
    assert queued and queued[0]["status"] == "pending", train_run["slow_at_finish"]
    # Its tries time out and are retried with the same webhook-id (its later events are tried in between).
    deadline = time.time() + 30
    while sum(r["headers"]["webhook-id"] == queued[0]["id"] for r in train_run["hanging"].requests) < 2:
        assert time.time() < deadline, "the hanging endpoint's first delivery was not retried"
        time.sleep(0.2)
    tried = [d for d in deliveries(platform, slow["id"]) if d["id"] == queued[0]["id"]][0]
    assert tried["attempts"] >= 2 and "timed out" in tried["last_error"] and tried["last_status_code"] is None


def test_a_500_then_200_is_delivered_on_the_second_try_with_the_same_id(platform):
    receiver = Receiver(lambda n, request: 500 if n == 0 else 200)
    hook = create(platform, receiver.url, event_types=["job.failed"])
    ping = platform.http.post(f"/v1/webhooks/{hook['id']}/ping")
    assert ping.status_code == 202 and ping.json()["status"] == "pending" and ping.json()["event_type"] == "webhook.ping"
    first, second = receiver.wait_for(2)
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == ping.json()["id"]
    assert first["body"] == second["body"] and json.loads(first["body"])["data"] == {"webhook_id": hook["id"]}
    assert signature_valid(hook["secret"], first) and signature_valid(hook["secret"], second)
    done = wait_delivery(platform, hook["id"], ping.json()["id"])
    assert done["status"] == "delivered" and done["attempts"] == 2 and done["last_status_code"] == 200
    receiver.close()


def test_the_last_failed_try_fails_the_delivery_and_disables_the_endpoint(platform):
    receiver = Receiver(lambda n, request: 500)
    hook = create(platform, receiver.url)
    ping = platform.http.post(f"/v1/webhooks/{hook['id']}/ping").json()
    done = wait_delivery(platform, hook["id"], ping["id"], timeout=30)
    assert done["status"] == "failed" and done["attempts"] == 5 and done["last_status_code"] == 500  # 5 tries set
    assert len(receiver.requests) == 5
    disabled = platform.http.get(f"/v1/webhooks/{hook['id']}").json()
    assert disabled["status"] == "disabled" and "HTTP 500" in disabled["disabled_reason"]
    # A disabled endpoint gets no new deliveries (for jobs: see the outbox test); a ping says to enable it first.
    refused = platform.http.post(f"/v1/webhooks/{hook['id']}/ping")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "webhook_disabled"
    enabled = platform.http.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True}).json()
    assert enabled["status"] == "enabled" and enabled["disabled_at"] is None
    receiver.close()


def test_after_rotation_deliveries_verify_with_the_new_secret_only(platform):
    receiver = Receiver()
    hook = create(platform, receiver.url, event_types=["job.requeued"])  # pings only, in practice
    assert hook["secret"].startswith("whsec_") and len(base64.b64decode(hook["secret"][6:])) >= 24
    assert "secret" not in platform.http.get(f"/v1/webhooks/{hook['id']}").json()
    assert all("secret" not in h for h in platform.http.get("/v1/webhooks").json()["data"])
    platform.http.post(f"/v1/webhooks/{hook['id']}/ping")
    before = receiver.wait_for(1)[0]
    rotated = platform.http.post(f"/v1/webhooks/{hook['id']}/rotate_secret").json()
    assert rotated["secret"] != hook["secret"]
    platform.http.post(f"/v1/webhooks/{hook['id']}/ping")
    after = receiver.wait_for(2)[1]
    assert signature_valid(hook["secret"], before) and not signature_valid(rotated["secret"], before)
    assert signature_valid(rotated["secret"], after) and not signature_valid(hook["secret"], after)
    # The SDK's verifier (the standardwebhooks package) agrees with the hand-written check.
    from client.sdk import WebhookVerificationError, verify_webhook
    assert verify_webhook(rotated["secret"], after["headers"], after["body"])["type"] == "webhook.ping"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(hook["secret"], after["headers"], after["body"])
    with pytest.raises(WebhookVerificationError):
        verify_webhook(rotated["secret"], {**after["headers"], "webhook-signature": "v1"}, after["body"])
    receiver.close()


def test_unsafe_urls_and_unknown_event_types_are_422s_naming_the_field(platform):
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]:9/x",
                "ftp://127.0.0.1/hook", "http://user:pw@127.0.0.1/hook", "http://127.0.0.1:99999/", "not a url"):
        r = platform.http.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422 and r.json()["error"]["param"] == "url", (url, r.text)
    r = platform.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "event_types": ["job.exploded"]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "event_types", r.text
    hook = create(platform, "http://127.0.0.1:9/x")  # loopback: this platform allows 127.0.0.0/8
    assert hook["event_types"] == ["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled",
                                   "job.requeued"]
    r = platform.http.patch(f"/v1/webhooks/{hook['id']}", json={"url": "http://169.254.169.254/"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "url"
    platform.http.delete(f"/v1/webhooks/{hook['id']}")


def test_without_the_allow_setting_loopback_is_refused_at_creation_and_at_every_send():
    from api.errors import APIError
    from api.webhooks import sender, service
    from core.netguard import address_policy
    from core.settings import Settings

    public_only = Settings(outbound_allowed_networks="")
    for url in ("http://localhost:8000/hook", "http://127.0.0.1/hook", "http://169.254.169.254/", "http://10.1.2.3/"):
        with pytest.raises(APIError) as refused:
            service.check_url(url, public_only)
        assert refused.value.status == 422 and refused.value.param == "url"
    # The send step resolves the name again on every try: the same endpoint is refused once the policy (or the
    # name's DNS answer) no longer allows its address, and nothing connects.
    receiver = Receiver()
    refused_try = sender.send(public_only, receiver.url.replace("127.0.0.1", "localhost"), "whsec_AAAA", "msg_x", "{}")
    assert refused_try.status_code is None and refused_try.error.startswith("address refused")
    allowed = Settings(outbound_allowed_networks="127.0.0.0/8")
    ok = sender.send(allowed, receiver.url, "whsec_" + base64.b64encode(b"k" * 24).decode(), "msg_y", "{}")
    assert ok.ok and receiver.requests and receiver.requests[0]["headers"]["webhook-id"] == "msg_y"
    assert len(receiver.requests) == 1
    loopback = address_policy([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")])
    target = sender.resolve_target("http://localhost:8123/p?q=1", loopback)
    assert target.host_header == "localhost:8123" and target.url.split("//")[1].split("/")[0] in (
        "127.0.0.1:8123", "[::1]:8123") and target.url.endswith("/p?q=1")
    receiver.close()


def test_another_projects_webhook_is_404_and_creation_is_idempotent(platform, other_project_headers):
    hook = create(platform, "http://127.0.0.1:9/mine")
    theirs = httpx.Client(base_url=platform.base, headers=other_project_headers)
    for method, path in (("GET", ""), ("DELETE", ""), ("PATCH", ""), ("POST", "/rotate_secret"), ("POST", "/ping"),
                         ("GET", "/deliveries")):
        r = theirs.request(method, f"/v1/webhooks/{hook['id']}{path}", json={} if method == "PATCH" else None)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path, r.text)
    assert hook["id"] not in [h["id"] for h in theirs.get("/v1/webhooks").json()["data"]]
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = platform.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/idem"}, headers=key)
    again = platform.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/idem"}, headers=key)
    other = platform.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/other"}, headers=key)
    assert first.status_code == again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert first.json() == again.json() and other.status_code == 409
    page = platform.http.get("/v1/webhooks", params={"limit": 1}).json()
    assert len(page["data"]) == 1 and page["has_more"]
    assert platform.http.delete(f"/v1/webhooks/{hook['id']}").json() == {"id": hook["id"], "object": "webhook",
                                                                        "deleted": True}
    assert platform.http.get(f"/v1/webhooks/{hook['id']}").status_code == 404


def test_cli_webhooks_create_list_and_deliveries(platform):
    receiver = Receiver()
    base = ["--base-url", platform.base, "--api-key", platform.headers["Authorization"].split()[1]]
    out = platform.cli(*base, "webhooks", "create", receiver.url, "--event", "job.succeeded", "--event", "job.failed",
                       "--description", "from the cli")
    assert out.returncode == 0, out.stdout + out.stderr
    secret = out.stdout.strip().splitlines()[-1]
    webhook_id = out.stdout.split()[1]
    assert secret.startswith("whsec_") and webhook_id.startswith("wh_")
    listed = platform.cli(*base, "webhooks", "list")
    assert listed.returncode == 0 and webhook_id in listed.stdout and "enabled" in listed.stdout
    made = platform.http.get(f"/v1/webhooks/{webhook_id}").json()
    assert made["description"] == "from the cli" and made["event_types"] == ["job.succeeded", "job.failed"]
    platform.http.post(f"/v1/webhooks/{webhook_id}/ping")
    assert signature_valid(secret, receiver.wait_for(1)[0])
    deadline = time.time() + 10
    while "delivered" not in (shown := platform.cli(*base, "webhooks", "deliveries", webhook_id)).stdout:
        assert time.time() < deadline, shown.stdout
    assert "webhook.ping" in shown.stdout and "200" in shown.stdout
    receiver.close()


def test_outbox_rows_share_the_status_changes_transaction():
    """In the ledger itself: a claim rolled back leaves no delivery; committed, each change carries the job object."""
    from core.ids import new_id
    from db import lifecycle
    from db.models import Job, Webhook, WebhookDelivery
    from db.repositories import webhooks as repo
    from db.repositories.jobs import insert_job
    from db.repositories.projects import get_or_create_project
    from db.session import transaction

    with fresh_database() as url:
        with transaction(url) as session:
            project = get_or_create_project(session, "outbox")
            lonely = get_or_create_project(session, "no-webhooks")
            repo.add_webhook(session, Webhook(id=new_id("wh"), project_id=project.id, url="http://127.0.0.1:9/",
                                              event_types=["job.running", "job.requeued"], secret="whsec_AAAA",
                                              created_at=time.time()))
            repo.add_webhook(session, Webhook(id=new_id("wh"), project_id=project.id, url="http://127.0.0.1:9/",
                                              event_types=["job.running"], secret="whsec_AAAA", created_at=time.time(),
                                              disabled_at=time.time(), disabled_reason="tries failed"))
            jobs = []
            for owner in (project, lonely):
                job = Job(id=new_id("job"), project_id=owner.id, status="queued", method="train",
                          algorithm="supervised", spec={"method": "train"}, metadata_={}, created_at=time.time(),
                          attempt=1, max_attempts=3, max_seconds=60, used_seconds=0.0, cancel_requested=False,
                          progress={})
                insert_job(session, job)
                jobs.append(job.id)
        job_id, lonely_job = jobs
        with pytest.raises(RuntimeError), transaction(url) as session:
            assert lifecycle.claim(session, job_id, "w", lease_seconds=0.01)
            raise RuntimeError("the worker's transaction fails after the claim")
        with transaction(url) as session:
            assert session.query(WebhookDelivery).count() == 0 and session.get(Job, job_id).status == "queued"
            assert lifecycle.claim(session, job_id, "w", lease_seconds=0.01)
            assert lifecycle.claim(session, lonely_job, "w", lease_seconds=0.01)
        time.sleep(0.05)
        with transaction(url) as session:
            lifecycle.reap_expired(session)
        with transaction(url) as session:
            rows = session.query(WebhookDelivery).order_by(WebhookDelivery.created_at).all()
            assert [(r.event_type, r.job_id) for r in rows] == [("job.running", job_id), ("job.requeued", job_id)]
            bodies = [json.loads(r.body) for r in rows]
            assert [b["data"]["status"] for b in bodies] == ["running", "queued"]
            assert bodies[1]["data"]["attempt"] == 2 and bodies[1]["type"] == "job.requeued"
            assert repo.delivery_outcomes(session) == {"pending": 2, "delivered": 0, "failed": 0}


@pytest.fixture(scope="module")
def sender_less_api(platform, tmp_path_factory):
    """An API that runs no sender of its own (REFINERY_RUN_WEBHOOK_SENDER=false), so `refinery webhook-sender`
    processes started by the test are the only ones sending."""
    home = tmp_path_factory.mktemp("sender-home")
    with fresh_database() as url:
        env = dict(platform.env, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=url, REFINERY_PORT=str(free_port()),
                   REFINERY_STORAGE_URL=f"file://{home / 'store'}", REFINERY_RUN_WEBHOOK_SENDER="false",
                   REFINERY_QUEUE=f"refinery.sender-test.{uuid.uuid4().hex[:8]}",
                   # Long enough that the first try is still waiting for its answer when its sender is killed.
                   REFINERY_WEBHOOK_TIMEOUT_SECONDS="5", REFINERY_WEBHOOK_LEASE_SECONDS="6.5")
        api = Platform(env, home)
        api.start_api()
        try:
            yield api
        finally:
            api.stop()


def start_sender(api: Platform, name: str) -> subprocess.Popen:
    log = open(api.home / f"{name}.log", "ab")
    return subprocess.Popen([str(Path(sys.executable).parent / "refinery"), "webhook-sender"], env=api.env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_sender_killed_mid_delivery_loses_nothing_and_senders_never_double_send(sender_less_api):
    api = sender_less_api
    killed = threading.Event()

    def answer(n, request):
        if n == 0:  # the first try hangs until its sender is dead
            killed.wait(60)
        return 200

    receiver = Receiver(answer)
    hook = create(api, receiver.url)
    senders = [start_sender(api, "sender-1")]
    try:
        ping = api.http.post(f"/v1/webhooks/{hook['id']}/ping").json()
        first = receiver.wait_for(1, timeout=60)[0]  # the sender is now waiting for the receiver's answer
        os.kill(senders[0].pid, signal.SIGKILL)
        senders[0].wait(10)
        killed.set()
        assert deliveries(api, hook["id"])[0]["status"] == "pending"
        senders += [start_sender(api, "sender-2"), start_sender(api, "sender-3")]
        second = receiver.wait_for(2, timeout=60)[1]  # after the dead sender's lease ran out
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == ping["id"]
        assert signature_valid(hook["secret"], second)
        done = wait_delivery(api, hook["id"], ping["id"])
        assert done["status"] == "delivered" and done["attempts"] == 2 and done["last_status_code"] == 200
        # Two live senders and a burst of deliveries: each is sent exactly once.
        ids = [api.http.post(f"/v1/webhooks/{hook['id']}/ping").json()["id"] for _ in range(10)]
        for delivery_id in ids:
            wait_delivery(api, hook["id"], delivery_id)
        arrived = [r["headers"]["webhook-id"] for r in receiver.requests[2:]]
        assert sorted(arrived) == sorted(ids)
    finally:
        for proc in senders:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
        receiver.close()
