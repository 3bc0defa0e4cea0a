"""`celery -A worker.app worker|beat|flower`: the process entry the Procfile, compose and
Kubernetes name. The Celery app itself lives in `tasks.celery_app`."""

from tasks.celery_app import app

__all__ = ["app"]
