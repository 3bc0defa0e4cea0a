"""The HTTP ingest API (`braze-subs api`, the Procfile's `api:`): changes from any language.

An entry point beside `tasks` (the Python producer and the Celery task) and `admin` (the
CLI): it enqueues through the same producer path (`tasks.producer`, `stores.buffer`) and
loads no delivery code.
"""
