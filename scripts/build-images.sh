#!/usr/bin/env bash
# Build the Molecule images offline (no registry here): one Debian bookworm root file system with
# PostgreSQL, python3 and psycopg2, made by mmdebstrap from Debian's packages and imported twice:
#   stock-monitoring-db/postgres:15        entrypoint with the official postgres image's interface
#   stock-monitoring-db/deploy-host:12     the host Ansible targets (python3, psycopg2)
# With a registry, use the official images instead (MOLECULE_POSTGRES_IMAGE, MOLECULE_DEPLOY_HOST_IMAGE).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pg_image=${MOLECULE_POSTGRES_IMAGE:-stock-monitoring-db/postgres:15}
host_image=${MOLECULE_DEPLOY_HOST_IMAGE:-stock-monitoring-db/deploy-host:12}
if [[ $pg_image != stock-monitoring-db/* ]]; then
  # Official images (a machine with a registry, e.g. GitHub's runners): pull instead of building.
  docker pull -q "$pg_image" && docker pull -q "$host_image"
  exit 0
fi
stamp=$(cat "$root/molecule/images/postgres-entrypoint.sh" "$0" | sha256sum | cut -c1-12)
if [ "$(docker image inspect -f '{{ index .Config.Labels "stamp" }}' "$pg_image" 2>/dev/null)" = "$stamp" ] &&
   docker image inspect "$host_image" >/dev/null 2>&1; then
  echo "build-images: $pg_image and $host_image are up to date"; exit 0
fi
command -v mmdebstrap >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "build-images: needs mmdebstrap (apt-get install -y mmdebstrap)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; }
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
echo "build-images: mmdebstrap bookworm (about 30 s)"
# The hooks' "$1" (the new root) is expanded by mmdebstrap, not here.
# shellcheck disable=SC2016
mmdebstrap --quiet --variant=minbase \
  --include=postgresql-15,python3,python3-psycopg2,ca-certificates \
  --customize-hook="upload $root/molecule/images/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" \
  --customize-hook='chmod 755 "$1/usr/local/bin/docker-entrypoint.sh"' \
  --customize-hook='rm -rf "$1"/var/lib/postgresql/15/main "$1"/etc/postgresql/15/main' \
  bookworm "$tmp/rootfs.tar"
docker import --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' --change 'CMD ["postgres"]' \
  --change "LABEL stamp=$stamp" --change 'ENV LANG=C.UTF-8' "$tmp/rootfs.tar" "$pg_image" >/dev/null
docker import --change 'CMD ["sleep", "infinity"]' --change 'ENV LANG=C.UTF-8' "$tmp/rootfs.tar" "$host_image" >/dev/null
echo "build-images: built $pg_image and $host_image"
