#!/usr/bin/env bash
# Builds a local RabbitMQ image from Debian's package, for hosts that cannot pull
# rabbitmq:3.13.7-alpine (the `rabbitmq` and `cluster` profiles' image) but reach a Debian
# mirror: the base image of deploy/base-image.sh plus `apt-get install rabbitmq-server`
# (bookworm: RabbitMQ 3.10, quorum queues included). Prints the image's name on stdout.
#
#   RABBITMQ_IMAGE=$(deploy/rabbitmq-image.sh "$(deploy/base-image.sh)")
#   DEBIAN_MIRROR=http://mirror.example/debian deploy/rabbitmq-image.sh BASE
#
# It carries a `docker-entrypoint.sh` doing what the official image's does for the compose
# file's command (`docker-entrypoint.sh rabbitmq-server`): own the data directory, drop
# root for the `rabbitmq` user, log to stdout. RABBITMQ_DEFAULT_USER / _PASS are read by
# rabbitmq-server itself. The name carries a hash of the base and this script, so a second
# run finds the image and returns at once. Needs podman (root, as the base image).
set -euo pipefail
base=${1:?usage: deploy/rabbitmq-image.sh BASE_IMAGE}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
hash=$({ echo "$base"; podman image inspect --format '{{.Id}}' "$base"; cat "$0"; } | sha256sum | cut -c1-12)
name=localhost/braze-subs-rabbitmq:$hash
if podman image exists "$name"; then
  echo "$name"
  exit 0
fi

context=$(mktemp -d "${TMPDIR:-/var/tmp}/braze-subs-rabbitmq.XXXXXX")
trap 'rm -rf "$context"' EXIT
cat > "$context/docker-entrypoint.sh" <<'ENTRY'
#!/bin/sh
# Stands in for the official rabbitmq image's entrypoint (deploy/rabbitmq-image.sh).
set -e
if [ "${1:-}" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
  shift
  # Debian's /usr/sbin/rabbitmq-server, run as root, would write the log to files under
  # /var/log/rabbitmq: start the server itself as `rabbitmq`, logging to stdout.
  exec setpriv --reuid rabbitmq --regid rabbitmq --init-groups \
    env HOME=/var/lib/rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
ENTRY
cat > "$context/Containerfile" <<CONTAINERFILE
FROM $base
RUN echo "deb $mirror bookworm main" > /etc/apt/sources.list \\
    && apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/lib/rabbitmq/mnesia
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh
ENV RABBITMQ_LOGS=- RABBITMQ_SASL_LOGS=-
VOLUME /var/lib/rabbitmq
EXPOSE 5672
CMD ["docker-entrypoint.sh", "rabbitmq-server"]
CONTAINERFILE
echo "building $name: $base + Debian's rabbitmq-server (a minute)" >&2
podman build --format docker --network host -t "$name" "$context" >&2
echo "$name"
