#!/usr/bin/env bash
# make demo: a throwaway PostgreSQL under .demo/ (git-ignored), a demo .env, deploy-db.yml twice
# (the second run must change nothing), then verify-db.yml. make demo-stop ends it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
demo="$root/.demo"
cd "$root"

case "${1:-start}" in
stop)
  if [ -d "$demo/pg" ]; then python scripts/pgcluster.py stop "$demo/pg" && echo "demo: PostgreSQL stopped"; fi
  rm -rf "$demo"
  echo "demo: removed $demo"
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

mkdir -p "$demo" && chmod 755 "$demo"
port=$(python scripts/pgcluster.py start "$demo/pg")
password=$(cat "$demo/pg/password")
umask 077
cat > "$demo/.env" <<ENV
# Demo settings for the Stock Monitoring backend (written by make demo)
POSTGRES_HOST=127.0.0.1
POSTGRES_PORT=$port
POSTGRES_USER=postgres
POSTGRES_PASSWORD='$password'
POSTGRES_DB=stock_monitoring
ENV
export STOCK_MONITORING_DB_ENV_FILE="$demo/.env"

echo "== deploy-db.yml, first run: creates the database and applies 022/023"
ansible-playbook -i inventory/local playbooks/deploy-db.yml
echo "== deploy-db.yml, second run: must change nothing"
ansible-playbook -i inventory/local playbooks/deploy-db.yml | tee "$demo/second-deploy.log"
grep -Eq 'localhost +: ok=[0-9]+ +changed=0 ' "$demo/second-deploy.log" ||
  { echo "demo: the second deploy changed something" >&2; exit 1; }
echo "== verify-db.yml: read-only check"
ansible-playbook -i inventory/local playbooks/verify-db.yml

cat <<INFO

demo: PostgreSQL is running on 127.0.0.1:$port (data in $demo/pg, log in $demo/pg/server.log)
demo: its .env is $demo/.env; the password is in it (and in $demo/pg/password)
demo: look around:  set -a; . $demo/.env; set +a; PGPASSWORD="\$POSTGRES_PASSWORD" psql -h 127.0.0.1 -p $port -U postgres stock_monitoring
demo:               then: SELECT * FROM stock_monitoring.pg_migrate_history;
demo: stop it with: make demo-stop
INFO
