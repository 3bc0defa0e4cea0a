# braze-subs: one image for worker, beat, flower and the simulator (see docker-compose.yml).
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 app
WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p config stores/lua tasks simulator \
    && touch config/__init__.py worker/__init__.py tasks/__init__.py simulator/__init__.py \
    && python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir . \
    && .venv/bin/pip uninstall -y braze-subs \
    && rm -rf config worker tasks simulator

# Then the code. The virtualenv sits at /app/.venv, so the Procfile's commands work as is.
COPY config config
COPY worker worker
COPY tasks tasks
COPY simulator simulator
RUN .venv/bin/pip install --no-cache-dir --no-deps . && chown -R app /app

USER app
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
CMD [".venv/bin/celery", "-A", "worker.app", "worker", "--loglevel", "INFO"]
