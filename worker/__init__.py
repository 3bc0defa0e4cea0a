"""Process entry points: `celery -A worker.app ...` (the worker, beat and Flower processes)
and `python -m worker` (the admin CLI, same as `braze-subs`). Everything they run lives in
the layers below: core <- stores <- delivery <- tasks <- admin."""
