"""braze-subs worker: the Celery app and its mechanisms (buffer, batching, Braze client)."""
