#!/usr/bin/env bash
# Fills a directory with every wheel the image installs, for a build that cannot reach an
# index (`--build-arg WHEELS=...`). The wheels are resolved by the base image's own Python,
# so environment markers (python_full_version, platform) match the image, not this host.
#
#   deploy/wheels.sh BASE_IMAGE DIR       # e.g. deploy/wheels.sh "$(deploy/base-image.sh)" wheels
#
# Needs podman and, from a container, PyPI (or the index in PIP_INDEX_URL). The host's CA
# bundle is lent to pip, for networks that reach the index through an inspecting proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: deploy/wheels.sh BASE_IMAGE DIR}
dir=${2:?usage: deploy/wheels.sh BASE_IMAGE DIR}
mkdir -p "$dir"
ca=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  ca=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -e PIP_CERT=/run/host-ca.crt)
fi
podman run --rm --network=host "${ca[@]}" -e PIP_INDEX_URL -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
  -v "$PWD/pyproject.toml:/src/pyproject.toml:ro" -v "$(realpath "$dir"):/wheels" \
  "$image" sh -ec '
    python -c "import tomllib; print(\"\n\".join(tomllib.load(open(\"/src/pyproject.toml\", \"rb\"))[\"project\"][\"dependencies\"]))" > /tmp/requirements.txt
    python -m venv /tmp/venv
    # setuptools: the build backend of pyproject.toml, for the build of braze-subs itself.
    /tmp/venv/bin/pip wheel -q -w /wheels -r /tmp/requirements.txt "setuptools>=77"
  '
ls "$dir" | wc -l | xargs echo "wheels in $dir:" >&2
