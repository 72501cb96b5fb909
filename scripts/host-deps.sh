#!/usr/bin/env bash
# System packages the tests and the demo need, installed only when missing (Debian/Ubuntu, as root):
# the PostgreSQL server binaries (initdb, pg_ctl; psql comes with them) for throwaway clusters.
# Docker and mmdebstrap are handled by docker-up.sh and build-images.sh when Molecule runs.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v psql >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "host-deps: the PostgreSQL server binaries are missing; as root: apt-get install -y postgresql" >&2
  exit 1
fi
echo "host-deps: installing Debian's postgresql (server binaries only, no cluster is created)"
mkdir -p /etc/postgresql-common
grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
