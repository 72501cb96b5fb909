#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io when dockerd is missing, start the
# daemon when it is not running (no systemd here). Host networking only: no bridge, no iptables.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker-up: installing Debian's docker.io"
  [ "$(id -u)" = 0 ] || { echo "docker-up: dockerd is missing; run as root or: apt-get install -y docker.io" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  echo "docker-up: starting dockerd (log: /var/log/dockerd.log)"
  nohup dockerd --bridge=none --iptables=false >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done
  echo "docker-up: dockerd did not answer within 30 s; see /var/log/dockerd.log" >&2
  exit 1
fi
