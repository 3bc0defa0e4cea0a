"""Entry points: the producer API and the Celery tasks."""
