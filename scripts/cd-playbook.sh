#!/usr/bin/env bash
# CD: plan, deploy or verify production the way the workflow's jobs do (after make setup and
# scripts/ci-ssh-setup.sh).
#   scripts/cd-playbook.sh plan|deploy|verify
#   STOCK_MONITORING_DB_INVENTORY  inventory to use (default: inventory/production)
#   STOCK_MONITORING_DB_REPORT     where the JSON report goes (read by inventory/production's group_vars)
# The project's ansible.cfg is used from any directory, and a relative path is taken from the caller's.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
case ${1:-} in
  plan) args=("$project/playbooks/deploy-db.yml" --check --diff) ;;
  deploy) args=("$project/playbooks/deploy-db.yml") ;;
  verify) args=("$project/playbooks/verify-db.yml") ;;
  *) echo "usage: $0 plan|deploy|verify" >&2; exit 2 ;;
esac
export ANSIBLE_CONFIG="$project/ansible.cfg"
exec "$project/.venv/bin/ansible-playbook" -i "${STOCK_MONITORING_DB_INVENTORY:-$project/inventory/production}" "${args[@]}"
