#!/bin/sh
# Shared entrypoint of the Refinery images (api, worker, worker-gpu); runs under tini as PID 1.
#
#   <image> api       -> refinery api --host 0.0.0.0 --port $REFINERY_PORT (uvicorn on api.main:app)
#   <image> worker    -> celery -A workers.app worker, one job per process (scale by replicas), on the queues of
#                        the resource classes in REFINERY_WORKER_CLASSES (default cpu)
#   <image> migrate   -> refinery migrate (Alembic upgrade head)
#   <image> CMD ...   -> exec'd as given (e.g. `refinery keys create --project NAME`)
#
# Extra arguments after a shortcut are passed on, e.g. `worker --loglevel=DEBUG`.
set -eu

: "${REFINERY_HOME:=/var/lib/refinery}"
export REFINERY_HOME
# Scratch space for jobs; on Kubernetes an emptyDir is mounted here (the root filesystem is read-only).
mkdir -p "$REFINERY_HOME" 2>/dev/null || true

case "${1:-}" in
  api)
    shift
    exec refinery api --host 0.0.0.0 --port "${REFINERY_PORT:-8000}" "$@"
    ;;
  worker)
    shift
    exec celery -A workers.app worker --pool=solo --concurrency=1 --loglevel=INFO "$@"
    ;;
  migrate)
    shift
    exec refinery migrate "$@"
    ;;
esac

exec "$@"
