"""What users ask about instead of braze-subs: one Celery task per change with Celery's
`rate_limit` (`naive`), and a `celery_batches.Batches` task (`batched`).

Both are written as a typical user would write them, from the same environment variables
as braze-subs (`REDIS_URL`, `BRAZE_REST_ENDPOINT`, `BRAZE_API_KEY`, `BRAZE_RATE_LIMIT`,
`BRAZE_RATE_LIMIT_WINDOW_SECONDS`) plus `BENCH_WORKERS`, the number of worker processes the
budget is split across (Celery's `rate_limit` holds per worker instance).
"""
