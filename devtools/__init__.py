"""Dev tooling, outside the product's import path: the demo and the process launchers
(redis-server, the simulator, Celery processes) shared by the demo, tests and benchmarks."""
