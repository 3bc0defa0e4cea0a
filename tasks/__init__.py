"""Entry points: the Celery app and its tasks, the producer API and the bulk import."""
