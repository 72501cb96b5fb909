#!/usr/bin/env bash
# CD only: load the deploy key into an ssh-agent (never written to disk) and pin the production host
# keys from a secret; host key checking stays on (no ssh-keyscan, no StrictHostKeyChecking=no).
#   SSH_PRIVATE_KEY, SSH_KNOWN_HOSTS  the STOCK_MONITORING_SSH_KEY and STOCK_MONITORING_KNOWN_HOSTS secrets
#   RUNNER_TEMP, GITHUB_ENV           set by the runner; SSH_AUTH_SOCK and ANSIBLE_SSH_COMMON_ARGS go to GITHUB_ENV
# The pinned file lives in RUNNER_TEMP and Ansible's ssh is pointed at it, since ssh reads the home of
# the passwd entry, not $HOME (they differ in container jobs). OpenSSH may not add keys to it
# (UpdateHostKeys=no), and no other known_hosts file counts. Running it twice in a job is fine.
set -euo pipefail
: "${SSH_PRIVATE_KEY:?the STOCK_MONITORING_SSH_KEY secret is not set}"
: "${SSH_KNOWN_HOSTS:?the STOCK_MONITORING_KNOWN_HOSTS secret is not set}"
: "${RUNNER_TEMP:?RUNNER_TEMP is not set (the GitHub runner sets it)}"
: "${GITHUB_ENV:?GITHUB_ENV is not set (the GitHub runner sets it)}"
dir="$RUNNER_TEMP/stock-monitoring-db-ssh"
case $dir in *[[:space:]]*) echo "ci-ssh-setup: RUNNER_TEMP ($RUNNER_TEMP) holds white space" >&2; exit 1 ;; esac
install -d -m 700 "$dir"
known_hosts="$dir/known_hosts"
printf '%s\n' "$SSH_KNOWN_HOSTS" > "$known_hosts"
chmod 600 "$known_hosts"

sock="$dir/agent.sock"
# An agent from an earlier run in this job answers on the socket (ssh-add -l: 0 keys listed, 1 none);
# reuse it with its keys replaced. Otherwise start one, on a socket left by a dead agent too.
status=0
SSH_AUTH_SOCK="$sock" ssh-add -l >/dev/null 2>&1 || status=$?
if [ "$status" -le 1 ]; then
  SSH_AUTH_SOCK="$sock" ssh-add -D >/dev/null 2>&1
else
  rm -f "$sock"
  ssh-agent -a "$sock" >/dev/null
fi
printf '%s\n' "$SSH_PRIVATE_KEY" | SSH_AUTH_SOCK="$sock" ssh-add - >/dev/null 2>&1 ||
  { echo "ci-ssh-setup: the STOCK_MONITORING_SSH_KEY secret is not a private key without a passphrase" >&2; exit 1; }
{
  echo "SSH_AUTH_SOCK=$sock"
  echo "ANSIBLE_SSH_COMMON_ARGS=-o UserKnownHostsFile=$known_hosts -o GlobalKnownHostsFile=/dev/null" \
       "-o StrictHostKeyChecking=yes -o UpdateHostKeys=no"
} >> "$GITHUB_ENV"
