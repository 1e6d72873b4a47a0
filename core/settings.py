"""Process settings: every knob is an environment variable with the prefix REFINERY_ (pydantic-settings)."""
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.netguard import parse_networks
from core.resources import parse_classes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFINERY_", extra="ignore")

    home: Path = Path(".refinery")
    # Empty means the embedded default under `home`: SQLite, kombu's filesystem transport, a local artifact dir.
    database_url: str = ""
    broker_url: str = ""
    queue: str = "refinery.jobs"  # the Celery queue jobs are published to and workers consume
    storage_url: str = ""
    bootstrap_token: str | None = None
    bootstrap_project: str = "default"
    data_roots: str = ""  # os.pathsep- or comma-separated directories that file:// URIs may read
    port: int = 8000
    workers: int = 1  # worker processes `refinery serve` starts and supervises
    # Resource classes this worker serves (comma-separated: cpu, cpu-x2, gpu, gpu-x4 …, core/resources.py); it
    # consumes their queues. Each worker writes its classes to the ledger every `worker_report_seconds`; a class no
    # worker reported within `worker_seen_seconds` shows its queued jobs as waiting_for no_worker_for_class.
    worker_classes: str = "cpu"
    worker_report_seconds: float = Field(default=5.0, gt=0)
    worker_seen_seconds: float = Field(default=30.0, gt=0)

    # Budget: the server default when a spec names none, and the cap no spec may exceed.
    default_max_seconds: int = 600
    max_seconds_cap: int = 24 * 3600
    max_attempts: int = 3

    # Leases and sweeps, in seconds. A lease is renewed by the worker's heartbeat thread.
    heartbeat_seconds: float = 2.0
    # Metric points and debug events are written together at most this often (workers/runtime.py JobRun.flush).
    events_flush_seconds: float = 1.0
    lease_seconds: float = 15.0
    checkpoint_seconds: float = 5.0
    redispatch_seconds: float = 10.0  # a queued job is published again after this, then after twice as long …
    redispatch_max_seconds: float = 300.0  # … up to this
    sweep_seconds: float = 1.0
    # A worker idle this long while its Redis queue holds messages has a stalled consumer and exits (0 = never).
    worker_stall_seconds: float = 30.0
    run_sweeper: bool = True

    max_upload_bytes: int = 512 * 1024 * 1024
    # S3 artifact downloads answer 307 to a presigned URL valid this long, so the bytes never pass through the API.
    s3_presigned_downloads: bool = False
    presigned_url_seconds: int = Field(default=300, ge=1, le=7 * 24 * 3600)
    rate_limit_per_minute: int = 600
    # Where the per-key rate limit is kept: a redis:// URL shares one budget across API processes and replicas.
    # Empty means REFINERY_BROKER_URL when that is Redis, else a bucket in each API process (the embedded mode).
    rate_limit_url: str = ""
    # A key checked against the database is trusted this long (seconds) in each API process, so a poller costs no
    # auth query most of the time; a revoked key is refused within this time. 0 checks every request.
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    # API processes `refinery serve` and `refinery api` run (uvicorn --workers); each has its own db pool (30).
    api_processes: int = Field(default=1, ge=1, le=64)
    # The longest a long-poll (GET /v1/jobs/{id}?wait=N) holds a request open; below any proxy's idle timeout.
    long_poll_max_seconds: float = Field(default=60.0, gt=0, le=60)
    # Requests inside one API process at once (more wait at the door): below the db pool (30) and threads (40).
    api_concurrency: int = Field(default=24, ge=1, le=36)
    https_timeout_seconds: float = 60.0
    https_max_bytes: int = 1024 * 1024 * 1024

    # Private ranges (comma-separated CIDRs) that webhooks and MLflow export may reach anyway, for receivers inside
    # the operator's network; everything else must resolve to a public address. Dataset downloads stay public-only.
    outbound_allowed_networks: str = ""
    # The dashboard and webhook links point here (what `refinery open` prints); empty means http://127.0.0.1:<port>.
    public_url: str = ""

    # Webhooks. Every API process runs a sender (or run `refinery webhook-sender` alone). The retry schedule is the
    # wait before each try, the first try included (comma-separated seconds, ±20 % jitter; ≈ 27 h over 8 tries); the
    # last try's failure fails the delivery and disables the endpoint. A claimed delivery is leased for
    # `webhook_lease_seconds` (longer than one try can take), so a killed sender's delivery is retried by another.
    run_webhook_sender: bool = True
    webhook_retry_seconds: str = "0,5,300,1800,7200,18000,36000,36000"
    webhook_connect_timeout_seconds: float = 5.0
    webhook_timeout_seconds: float = 10.0  # for the receiver's answer
    webhook_lease_seconds: float = 30.0
    webhook_poll_seconds: float = 0.5
    webhook_sender_threads: int = Field(default=8, ge=1, le=64)  # endpoints served at once, one delivery each

    # Signs unlearn jobs' deletion certificates (HMAC-SHA256). Unset: a random key made on first use and kept in
    # $REFINERY_HOME/certificate_key (mode 600); workers on several machines must share one, so set it there.
    certificate_key: str | None = None

    # Datasets: a sharded dataset (a directory or manifest.json of Parquet / WebDataset tar shards) whose decoded
    # size (float32 inputs + int64 labels) is above this many bytes is streamed by the train method instead of being
    # loaded whole; a single dataset file above it is refused. Validation data is always held in memory, below it.
    max_inmemory_bytes: int = Field(default=2 * 1024**3, ge=1)
    stream_workers: int = Field(default=2, ge=0, le=32)  # DataLoader worker processes that read and decode shards
    stream_shuffle_rows: int = Field(default=4096, ge=1)  # rows shuffled together (the buffer of the shuffle)
    # Debug and audit: a directory where the train method appends, for every streamed batch it trains on, the line
    # "<epoch> <step> <row id> …" to <job_id>-attempt-<n>.log. Empty: off.
    stream_row_log: str = ""

    torch_threads: int = 1
    # The longest a rank of a multi-device job waits in a collective for the others (a lost rank is caught sooner,
    # by the elastic launcher; this bounds a hang).
    distributed_timeout_seconds: float = Field(default=300.0, gt=0)
    # Multi-node jobs (resources.nodes > 1, workers/distributed.py). The address other machines reach this worker
    # at (empty: this host name's address, else 127.0.0.1; Helm passes the pod IP); the port its rendezvous listens
    # on when it leads a job (0: a free port per job); how long it waits for the other nodes to join before it hands
    # the attempt back.
    worker_address: str = ""
    rendezvous_port: int = Field(default=0, ge=0, le=65535)
    nodes_join_seconds: float = Field(default=120.0, gt=0)
    device: str = "auto"  # cpu | cuda | auto (cuda when available)

    @field_validator("outbound_allowed_networks")
    @classmethod
    def _networks_parse(cls, value: str) -> str:
        parse_networks(value)  # a bad CIDR stops the process at start, naming the entry
        return value

    @field_validator("worker_classes")
    @classmethod
    def _classes_parse(cls, value: str) -> str:
        parse_classes(value)  # a typo stops the worker at start, naming the entry
        return value

    @field_validator("webhook_retry_seconds")
    @classmethod
    def _retry_schedule_parses(cls, value: str) -> str:
        schedule = [float(part) for part in value.split(",") if part.strip()]
        if not schedule or any(wait < 0 for wait in schedule):
            raise ValueError("webhook_retry_seconds: one or more non-negative numbers of seconds, comma-separated")
        return value

    @model_validator(mode="after")
    def _webhook_lease_outlasts_a_try(self) -> "Settings":
        if self.webhook_lease_seconds <= self.webhook_connect_timeout_seconds + self.webhook_timeout_seconds:
            raise ValueError("webhook_lease_seconds must be longer than a try can take (connect + answer timeouts), "
                             "or two senders could send the same try at once")
        return self

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> "Settings":
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'refinery.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'store'}"
        return self

    @property
    def outbound_networks(self) -> list:
        return parse_networks(self.outbound_allowed_networks)

    @property
    def webhook_retry_schedule(self) -> list[float]:
        return [float(part) for part in self.webhook_retry_seconds.split(",") if part.strip()]

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @property
    def data_root_paths(self) -> list[Path]:
        parts = [p for chunk in self.data_roots.split(",") for p in chunk.split(":")]
        return [Path(p).expanduser().resolve() for p in parts if p.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
