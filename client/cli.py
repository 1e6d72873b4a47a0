"""The `refinery` command. User commands (jobs, files, artifacts) go over HTTP with the SDK; the operator commands
(serve, api, migrate, keys) need the server code and database, and import them only when run."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from client.sdk import TERMINAL, Refinery, RefineryError

console = Console()


def _client(args) -> Refinery:
    return Refinery(args.base_url, args.api_key)


def cmd_submit(args) -> int:
    spec = json.loads(Path(args.spec).read_text() if args.spec != "-" else sys.stdin.read())
    job = _client(args).submit(spec, idempotency_key=args.idempotency_key)
    console.print(job["id"])
    return cmd_wait(argparse.Namespace(**{**vars(args), "job_id": job["id"]})) if args.wait else 0


def cmd_get(args) -> int:
    console.print_json(data=_client(args).job(args.job_id))
    return 0


def cmd_list(args) -> int:
    table = Table("status", "method", "algorithm", "accuracy", "attempt")
    table.add_column("id", no_wrap=True, min_width=31)  # ids must survive narrow (or no) terminals whole
    for i, job in enumerate(_client(args).jobs(status=args.status, method=args.method)):
        if i >= args.limit:
            break
        accuracy = ((job.get("result") or {}).get("metrics") or {}).get("accuracy")
        table.add_row(job["status"], job["method"], job["algorithm"], "" if accuracy is None else f"{accuracy:.4f}",
                      str(job["attempt"]), job["id"])
    console.print(table)
    return 0


def cmd_wait(args) -> int:
    client = _client(args)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(args.job_id, total=1.0)
        while True:
            job = client.job(args.job_id)
            bar.update(task, completed=job["progress"]["fraction"], description=f"{args.job_id} {job['status']}")
            if job["status"] in TERMINAL:
                break
            time.sleep(1)
    console.print_json(data={k: job[k] for k in ("id", "status", "result", "error")})
    return 0 if job["status"] == "succeeded" else 1


def cmd_cancel(args) -> int:
    console.print(_client(args).cancel(args.job_id)["status"])
    return 0


def cmd_download(args) -> int:
    console.print(str(_client(args).download(args.job_id, args.name, args.dest)))
    return 0


def cmd_upload(args) -> int:
    console.print(_client(args).upload(args.path, args.purpose)["id"])
    return 0


def cmd_export(args) -> int:
    export = _client(args).export_mlflow(args.job_id, args.tracking_uri, args.experiment, args.run_name,
                                         idempotency_key=args.idempotency_key)
    console.print_json(data=export)
    return 0


def cmd_open(args) -> int:
    client = _client(args)
    client.job(args.job_id)  # a 404 for a job that is not there (or not this key's), rather than a dead link
    url = client.dashboard_url(args.job_id, args.public_url)
    print(url)
    if args.browser:
        import webbrowser
        webbrowser.open(url)
    return 0


LEVEL_STYLES = {"debug": "dim", "info": "cyan", "warning": "yellow", "error": "bold red"}


def cmd_logs(args) -> int:
    """A job's events, one line each (time, level, type, message). --follow streams them (server-sent events)
    until the job finishes and exits like `wait`: 0 when it succeeded."""
    client = _client(args)
    for event in client.events(args.job_id, follow=args.follow):
        stamp = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
        style = LEVEL_STYLES.get(event["level"], "")
        # Text, not markup: messages hold brackets ("inputs [1, 8, 8]") that rich would read as styles.
        line = Text.assemble((stamp, "dim"), " ", (f"{event['level']:<7}", style), " ", (event["type"], "bold"),
                             " ", (event["message"], "dim" if event["level"] == "debug" else ""))
        console.print(line, soft_wrap=True)
    if not args.follow:
        return 0
    status = client.job(args.job_id)["status"]
    console.print(Text.assemble("job ", (status, "green" if status == "succeeded" else "red")), soft_wrap=True)
    return 0 if status == "succeeded" else 1


def cmd_verify_certificate(args) -> int:
    """Exit 0 when the signature and every hash that can be recomputed hold; 1, naming each problem, otherwise."""
    from client.certificates import CertificateError, certificate_key, verify_certificate

    try:
        key = certificate_key(args.key, args.key_file)
        if args.job:
            checked = _client(args).verify_certificate(args.job, args.file, key, dataset=args.dataset)
        else:
            folder = Path(args.artifacts) if args.artifacts else Path(args.file).parent
            files = {name: folder / name for name in ("model.safetensors", "model.onnx", "model.json")
                     if (folder / name).exists()}
            checked = verify_certificate(json.loads(Path(args.file).read_text()), key, files,
                                         Path(args.original) if args.original else None,
                                         Path(args.dataset) if args.dataset else None)
    except CertificateError as error:
        for problem in error.problems:
            console.print(f"[red]certificate invalid: {problem}[/red]")
        return 1
    except (OSError, ValueError) as error:
        console.print(f"[red]certificate unreadable: {error}[/red]")
        return 1
    console.print(f"certificate valid for {checked['job_id']}: checked {', '.join(checked['checked'])}")
    return 0


def cmd_serve(args) -> int:
    from core.embedded import serve
    from core.settings import get_settings
    serve(get_settings())
    return 0


def cmd_api(args) -> int:
    import uvicorn

    from core.embedded import KEEP_ALIVE_SECONDS
    from core.settings import get_settings
    processes = get_settings().api_processes  # REFINERY_API_PROCESSES: uvicorn workers on one socket
    uvicorn.run("api.main:app", host=args.host, port=args.port, proxy_headers=True,
                timeout_keep_alive=KEEP_ALIVE_SECONDS, workers=processes if processes > 1 else None)
    return 0


def cmd_migrate(args) -> int:
    from core.settings import get_settings
    from db.migrate import upgrade
    upgrade(get_settings().database_url)
    console.print("database is at the newest schema")
    return 0


def cmd_keys(args) -> int:
    from core.settings import get_settings
    from db.migrate import upgrade
    from db.repositories import projects
    from db.session import transaction

    settings = get_settings()
    upgrade(settings.database_url)
    with transaction(settings.database_url) as session:
        if args.keys_command == "create":
            project = projects.get_or_create_project(session, args.project)
            row, key = projects.create_key(session, project, name=args.name)
            print(f"Created {row.id} for project {project.name}. Store the key now; it is not shown again:")
            print(key)
        elif args.keys_command == "revoke":
            if not projects.revoke_key(session, args.key):
                print("no such active key", file=sys.stderr)
                return 1
            print("revoked")
        else:
            for row, project in projects.list_keys(session, args.project):
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id}  {project.name}  {row.prefix}…  {row.name or ''}  {state}")
    return 0


def cmd_webhooks(args) -> int:
    client = _client(args)
    if args.webhooks_command == "create":
        hook = client.create_webhook(args.url, args.event or None, args.description)
        console.print(f"Created {hook['id']} for {hook['url']} ({', '.join(hook['event_types'])}). "
                      "Store its signing secret now; it is not shown again:")
        print(hook["secret"])
    elif args.webhooks_command == "list":
        table = Table("status", "description")
        table.add_column("url", overflow="fold")  # whole, if folded: it is what tells endpoints apart
        table.add_column("events", overflow="fold")
        table.add_column("id", no_wrap=True, min_width=29)
        for hook in client.webhooks():
            table.add_row(hook["status"], hook["description"] or "", hook["url"], ", ".join(hook["event_types"]),
                          hook["id"])
        console.print(table)
    else:
        # Borderless, so the whole table fits 80 columns; errors follow it, one line each.
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("id", no_wrap=True, min_width=30)
        for name, width in (("event", 13), ("status", 9), ("tries", 5), ("http", 4), ("ms", 5)):
            table.add_column(name, no_wrap=True, min_width=width)
        errors = []
        for i, d in enumerate(client.webhook_deliveries(args.webhook_id)):
            if i >= args.limit:
                break
            table.add_row(d["id"], d["event_type"], d["status"], str(d["attempts"]), str(d["last_status_code"] or ""),
                          "" if d["last_latency_ms"] is None else f"{d['last_latency_ms']:.0f}")
            if d["last_error"]:
                errors.append(f"{d['id']}: {d['last_error']}")
        console.print(table)
        for line in errors:
            console.print(line, soft_wrap=True, markup=False)
    return 0


def cmd_webhook_sender(args) -> int:
    from api.webhooks.sender import run_forever
    from core.settings import get_settings
    run_forever(get_settings())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refinery", description="Refinery: compression and unlearning as a service.")
    parser.add_argument("--base-url", default=os.environ.get("REFINERY_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("REFINERY_API_KEY"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit a job spec (JSON file or - for stdin)")
    p.add_argument("spec")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("get", help="show a job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("list", help="list jobs")
    p.add_argument("--status")
    p.add_argument("--method")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("wait", help="follow a job's progress until it finishes")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_wait)
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("download", help="download an artifact, verifying its sha256")
    p.add_argument("job_id")
    p.add_argument("name")
    p.add_argument("dest", nargs="?", default=".")
    p.set_defaults(func=cmd_download)
    p = sub.add_parser("verify-certificate", help="check an unlearn job's certificate.json: its signature and the "
                                                  "hashes of the model files (and dataset) it certifies")
    p.add_argument("file", help="certificate.json")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--artifacts", help="folder holding the job's model.safetensors / model.onnx / model.json "
                                           "(default: the certificate's folder)")
    where.add_argument("--job", help="download the job's artifacts and the original model's weights to check")
    p.add_argument("--original", help="the original model's model.safetensors (with --artifacts)")
    p.add_argument("--dataset", help="the training file (.npz): recompute the forget set's sha256 from its rows")
    p.add_argument("--key", help="the signing key (default: REFINERY_CERTIFICATE_KEY, else "
                                 "$REFINERY_HOME/certificate_key)")
    p.add_argument("--key-file")
    p.set_defaults(func=cmd_verify_certificate)
    p = sub.add_parser("upload", help="upload a dataset or model file")
    p.add_argument("path")
    p.add_argument("--purpose", default="dataset", choices=["dataset", "model"])
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("export", help="export a finished job to another system")
    targets = p.add_subparsers(dest="export_target", required=True)
    e = targets.add_parser("mlflow", help="log the job to an MLflow tracking server as a run")
    e.add_argument("job_id")
    e.add_argument("--tracking-uri", required=True, help="e.g. http://mlflow.internal:5000")
    e.add_argument("--experiment", help="experiment name (created if missing); default refinery")
    e.add_argument("--run-name", help="default: the job id")
    e.add_argument("--idempotency-key")
    e.set_defaults(func=cmd_export)
    p = sub.add_parser("open", help="print the job's dashboard URL")
    p.add_argument("job_id")
    p.add_argument("--public-url", default=os.environ.get("REFINERY_PUBLIC_URL"),
                   help="where people reach the server, if not --base-url (default $REFINERY_PUBLIC_URL)")
    p.add_argument("--browser", action="store_true", help="also open it in a web browser")
    p.set_defaults(func=cmd_open)
    p = sub.add_parser("logs", help="a job's events; --follow streams them until the job ends")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("webhooks", help="manage webhook endpoints and see their deliveries")
    hooks = p.add_subparsers(dest="webhooks_command", required=True)
    h = hooks.add_parser("create", help="register an endpoint; prints its signing secret once")
    h.add_argument("url")
    h.add_argument("--event", action="append", metavar="TYPE", help="an event type to receive (repeat); default all")
    h.add_argument("--description")
    hooks.add_parser("list", help="list endpoints")
    h = hooks.add_parser("deliveries", help="an endpoint's deliveries, newest first")
    h.add_argument("webhook_id")
    h.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_webhooks)

    p = sub.add_parser("serve", help="run the embedded platform (API + worker, SQLite, local broker and store)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("api", help="run the API server (production)")
    p.add_argument("--host", default="0.0.0.0")  # noqa: S104  (in a container the API must listen on all interfaces)
    p.add_argument("--port", type=int, default=int(os.environ.get("REFINERY_PORT", 8000)))
    p.set_defaults(func=cmd_api)
    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("keys", help="manage API keys (talks to the database directly)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create")
    k.add_argument("--project", required=True)
    k.add_argument("--name")
    k = keys.add_parser("revoke")
    k.add_argument("key", help="the key itself or its key_… id")
    k = keys.add_parser("list")
    k.add_argument("--project")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("webhook-sender", help="run a webhook sender alone (every API process also runs one)")
    p.set_defaults(func=cmd_webhook_sender)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RefineryError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
