#!/usr/bin/env bash
# CD: plan, deploy or verify production the way the workflow's jobs do (after make setup and
# scripts/ci-ssh-setup.sh).
#   scripts/cd-playbook.sh plan|deploy|verify
#   STOCK_MONITORING_DB_INVENTORY  inventory to use (default: inventory/production)
#   STOCK_MONITORING_DB_REPORT     where the JSON report goes (read by inventory/production's group_vars)
#   STOCK_MONITORING_DB_PLAN       the reviewed plan: plan writes it (and, under GitHub Actions, its summary
#                                  into $GITHUB_STEP_SUMMARY); deploy applies exactly it, or refuses it
# The project's ansible.cfg is used from any directory, and a relative path is taken from the caller's.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
python="$project/.venv/bin/python"
# One extra variable as JSON, so that any path survives ansible-playbook's key=value parsing.
extra_var() { "$python" -c 'import json, sys; print(json.dumps({sys.argv[1]: sys.argv[2]}))' "$1" "$2"; }
plan=${STOCK_MONITORING_DB_PLAN:-}
case ${1:-} in
  plan) args=("$project/playbooks/deploy-db.yml" --check --diff)
        if [[ -n $plan ]]; then args+=(-e "$(extra_var stock_monitoring_db_plan_out "$plan")"); fi ;;
  deploy) args=("$project/playbooks/deploy-db.yml")
          if [[ -n $plan ]]; then args+=(-e "$(extra_var stock_monitoring_db_plan "$plan")"); fi ;;
  verify) args=("$project/playbooks/verify-db.yml") ;;
  *) echo "usage: $0 plan|deploy|verify" >&2; exit 2 ;;
esac
export ANSIBLE_CONFIG="$project/ansible.cfg"
"$project/.venv/bin/ansible-playbook" -i "${STOCK_MONITORING_DB_INVENTORY:-$project/inventory/production}" "${args[@]}"
if [[ $1 == plan && -n $plan && -n ${GITHUB_STEP_SUMMARY:-} ]]; then
  "$python" "$project/scripts/plan-summary.py" "$plan" >> "$GITHUB_STEP_SUMMARY"
fi
