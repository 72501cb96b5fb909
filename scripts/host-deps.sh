#!/usr/bin/env bash
# System packages the tests and the demo need, installed only when missing (Debian/Ubuntu, as root):
# - the PostgreSQL server binaries (initdb, pg_ctl; psql comes with them) for throwaway clusters;
# - openssh-server and Debian's python3-psycopg2, for the tests that deploy over real SSH to a
#   non-root user on this machine (its sshd is started by the tests on a port of their own, never
#   as a service);
# - shellcheck, which make lint runs on the shell scripts;
# - pgbouncer, for the tests that deploy through a connection pooler (started by the tests, never as a
#   service);
# - npm (and node), which fetch the server binaries of the other PostgreSQL majors (scripts/pgcluster.py).
# Docker and mmdebstrap are handled by docker-up.sh and build-images.sh when Molecule runs.
set -euo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v psql >/dev/null || missing+=(postgresql)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
/usr/bin/python3 -c 'import psycopg2' 2>/dev/null || missing+=(python3-psycopg2)
command -v shellcheck >/dev/null || missing+=(shellcheck)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v npm >/dev/null && command -v node >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "host-deps: missing ${missing[*]}; as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "host-deps: installing Debian's ${missing[*]} (no cluster is created, no service is started)"
mkdir -p /etc/postgresql-common
grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
  echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
# Keep the packages' services from starting (an sshd on port 22): policy-rc.d says no while installing.
policy=/usr/sbin/policy-rc.d
own_policy=false
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=true; fi
trap '$own_policy && rm -f "$policy"' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
