#!/usr/bin/env bash
# The composite action .github/actions/deploy-db: apply the migrations to a CI job's database with
# deploy-db.yml (inventory/local). Settings come from the environment:
#   POSTGRES_PASSWORD (required)      INPUT_HOST, INPUT_PORT, INPUT_USER, INPUT_DB, INPUT_CHECK (true: plan)
#   STOCK_MONITORING_DB_VENV          a virtualenv with requirements.txt (created when it has no ansible)
# Without it, the venv goes in RUNNER_TEMP, the job's own directory; outside GitHub Actions, in a new private
# directory (mktemp -d) removed at exit: a predictable path under a shared /tmp could hold another user's
# bin/ansible-playbook, which would run with POSTGRES_PASSWORD in its environment.
# The password never reaches a file or a command line: the .env written here holds the other four
# settings, and the role takes the password from this process's environment. The .env is removed
# whatever happens.
set -euo pipefail
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in the env of the step that uses the deploy-db action}"
project=$(cd "$(dirname "$0")/.." && pwd)
temp=${RUNNER_TEMP:-${TMPDIR:-/tmp}}
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT
if [ -n "${STOCK_MONITORING_DB_VENV:-}" ]; then
  venv=$STOCK_MONITORING_DB_VENV
elif [ -n "${RUNNER_TEMP:-}" ]; then
  venv=$RUNNER_TEMP/stock-monitoring-db-venv
else
  venv=$(mktemp -d "$temp/stock-monitoring-db-venv.XXXXXX")
  cleanup+=("$venv")
fi

if [ ! -x "$venv/bin/ansible-playbook" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$project/requirements.txt"
fi

# python-dotenv single quotes: \\ and \' are the only escapes; a line break cannot be written.
quote() {
  case $2 in *$'\n'* | *$'\r'*) echo "deploy-db: the $1 input holds a line break" >&2; exit 2 ;; esac
  local value=${2//\\/\\\\}
  printf "'%s'" "${value//\'/\\\'}"
}

# Assignments, so that set -e stops the script when quote refuses a value.
host=$(quote postgres-host "${INPUT_HOST:-127.0.0.1}")
port=$(quote postgres-port "${INPUT_PORT:-5432}")
user=$(quote postgres-user "${INPUT_USER:-postgres}")
db=$(quote postgres-db "${INPUT_DB:-stock_monitoring}")
env_file=$(mktemp "$temp/stock-monitoring-db-env.XXXXXX")
cleanup+=("$env_file")
printf 'POSTGRES_HOST=%s\nPOSTGRES_PORT=%s\nPOSTGRES_USER=%s\nPOSTGRES_DB=%s\n' "$host" "$port" "$user" "$db" > "$env_file"

args=(-i inventory/local playbooks/deploy-db.yml
      -e '{"stock_monitoring_db_postgres_password": "{{ lookup(\"ansible.builtin.env\", \"POSTGRES_PASSWORD\") }}"}')
case ${INPUT_CHECK:-false} in
  true) args+=(--check --diff) ;;
  false) ;;
  *) echo "deploy-db: the check input is '${INPUT_CHECK}'; use true or false" >&2; exit 2 ;;
esac
cd "$project"
STOCK_MONITORING_DB_ENV_FILE=$env_file "$venv/bin/ansible-playbook" "${args[@]}"
