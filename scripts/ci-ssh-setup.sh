#!/usr/bin/env bash
# CD only: load the deploy key into an ssh-agent (never written to disk) and pin the production host
# keys from a secret; host key checking stays on (no ssh-keyscan, no StrictHostKeyChecking=no).
set -euo pipefail
: "${SSH_PRIVATE_KEY:?the STOCK_MONITORING_SSH_KEY secret is not set}"
: "${SSH_KNOWN_HOSTS:?the STOCK_MONITORING_KNOWN_HOSTS secret is not set}"
install -d -m 700 "$HOME/.ssh"
printf '%s\n' "$SSH_KNOWN_HOSTS" > "$HOME/.ssh/known_hosts"
chmod 600 "$HOME/.ssh/known_hosts"
sock="$RUNNER_TEMP/ssh-agent.sock"
ssh-agent -a "$sock" >/dev/null
printf '%s\n' "$SSH_PRIVATE_KEY" | SSH_AUTH_SOCK="$sock" ssh-add - >/dev/null
echo "SSH_AUTH_SOCK=$sock" >> "$GITHUB_ENV"
