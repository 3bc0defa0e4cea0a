# braze-subs: one image for the worker, beat, Flower and the simulator (docker-compose.yml).
#
#   docker build -t braze-subs .
#   podman build -t braze-subs .
#
# BASE_IMAGE replaces only the FROM: any image with Python >= 3.11 and its venv module, e.g.
# a local one built from Debian's packages where no image registry is reachable
# (deploy/base-image.sh; README, "Containers").
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

# Where pip finds packages: PyPI by default, PIP_INDEX_URL for a mirror, or WHEELS for a
# directory of wheels mounted into the build (offline: pip then never asks an index), e.g.
#   podman build -v "$PWD/wheels:/wheels:ro" --build-arg WHEELS=/wheels -t braze-subs .
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG WHEELS=

# The installed commands (celery, braze-subs) are on PATH, as the Procfile expects.
ENV VIRTUAL_ENV=/opt/braze-subs \
    PATH=/opt/braze-subs/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /tmp/build/
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/build/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/build/requirements.txt \
    && python -m venv "$VIRTUAL_ENV" \
    && pip install ${WHEELS:+--no-index --find-links "$WHEELS"} -r /tmp/build/requirements.txt

# Then the code (every package of pyproject.toml), installed into the virtualenv as root:
# the user that runs it can read it and cannot change it.
COPY README.md /tmp/build/
COPY config /tmp/build/config
COPY core /tmp/build/core
COPY stores /tmp/build/stores
COPY delivery /tmp/build/delivery
COPY tasks /tmp/build/tasks
COPY api /tmp/build/api
COPY admin /tmp/build/admin
COPY worker /tmp/build/worker
# The simulator is dev tooling, not in the installed product (the runtime wheel leaves it
# out); it is kept beside it, for compose's `local` profile (run from that folder).
COPY simulator /opt/braze-subs-dev/simulator
RUN pip install --no-deps ${WHEELS:+--no-index --find-links "$WHEELS"} /tmp/build \
    && rm -rf /tmp/build \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/app app

USER app
WORKDIR /home/app

# The worker's heartbeat file, rewritten every second by a thread of the worker (the same
# probe as on Kubernetes; beat, Flower, the exporter and the simulator have their own
# checks in docker-compose.yml). `podman build` keeps it with `--format docker`.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["braze-subs", "probe", "live", "--role", "worker"]

CMD ["celery", "-A", "worker.app", "worker", "--loglevel", "INFO"]
