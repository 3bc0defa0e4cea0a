#!/bin/sh
# Tear down a podman-compose project of docker-compose.yml completely: every container (the
# workers `up --scale` added included), its pod, its volume and its network.
# `podman-compose down -v` (podman-compose 1.x) removes only the containers the file names
# and then fails on what the others still use, leaving the extra workers, Redis, the pod,
# the volume and the network behind. README: Containers, "Tearing it down".
#
#   deploy/podman-down.sh [PROJECT]
#
# PROJECT: as podman-compose names it: -p, else COMPOSE_PROJECT_NAME, else the folder of
# docker-compose.yml, lower-cased, without characters other than a-z 0-9 - _.
# The volume holds Redis's data: whatever was still buffered or in flight is gone with it.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
default=$(basename "$here" | tr 'A-Z' 'a-z' | tr -cd 'a-z0-9_-')
project=${1:-${COMPOSE_PROJECT_NAME:-$default}}
label="label=com.docker.compose.project=$project"

listed() { podman "$@" --quiet --filter "$label"; }

containers=$(listed ps --all)
# Workers get the compose file's grace period: posts not yet sent are handed back. On hosts
# without systemd podman logs an error per health-check timer it cannot remove: noise.
if [ -n "$containers" ]; then podman stop --time 30 $containers >/dev/null 2>&1 || true; fi
# The pod first: its infra container is what the others depend on.
podman pod rm --force --ignore "pod_$project" >/dev/null 2>&1 || true
left=$(listed ps --all)
if [ -n "$left" ]; then podman rm --force --ignore $left >/dev/null 2>&1 || true; fi
volumes=$(listed volume ls)
if [ -n "$volumes" ]; then podman volume rm --force $volumes >/dev/null; fi
networks=$(listed network ls)
if [ -n "$networks" ]; then podman network rm --force $networks >/dev/null; fi

remaining="$(listed ps --all) $(listed volume ls) $(listed network ls)"
if podman pod exists "pod_$project"; then remaining="$remaining pod_$project"; fi
if [ -n "$(echo $remaining)" ]; then
  echo "podman-down: still there after removal: $(echo $remaining)" >&2
  exit 1
fi
count() { set -- $1; echo $#; }
echo "$project: removed $(count "$containers") containers, its pod, $(count "$volumes") volumes, $(count "$networks") networks"
