#!/usr/bin/env bash
# Builds a local base image from Debian's packages, for hosts that cannot pull from an
# image registry (air-gapped sites, CI sandboxes) but reach a Debian mirror. One image
# stands in for both registry images the project uses: it carries Python 3.11 (for
# `--build-arg BASE_IMAGE=...` in place of python:3.11-slim) and redis-server (for
# `REDIS_IMAGE=...` in place of redis:7). Prints the image's name on stdout.
#
#   deploy/base-image.sh                      # -> localhost/braze-subs-base:bookworm-<hash>
#   DEBIAN_MIRROR=http://mirror.example/debian deploy/base-image.sh
#
# Needs root, podman and debootstrap. The name carries a hash of what goes in (the suite,
# the packages, this script), so a second run finds the image and returns at once.
set -euo pipefail

suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3 is 3.11 on bookworm; python3-venv brings ensurepip; redis-server brings redis-cli.
packages=python3,python3-venv,python-is-python3,ca-certificates,redis-server

hash=$({ echo "$suite $packages"; cat "$0"; } | sha256sum | cut -c1-12)
name=localhost/braze-subs-base:$suite-$hash
if podman image exists "$name"; then
  echo "$name"
  exit 0
fi

root=$(mktemp -d "${TMPDIR:-/var/tmp}/braze-subs-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "building $name with debootstrap from $mirror (a minute or two)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2
# What an image does not need: downloaded packages, package lists, documentation.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" --numeric-owner -c . |
  podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$name" >&2
echo "$name"
