#!/usr/bin/env bash
# ansible-test's validate-modules on library/*.py. ansible-test only runs inside
# ansible_collections/<namespace>/<name>/ in a git tree, so the modules are copied into a throwaway
# collection under build/. Offline, ansible-test cannot download its pip bootstrap script
# (get-pip-<version>.py); a stand-in in its cache makes the venv with ensurepip and installs the
# sanity requirements from the package index instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="$root/build/validate-modules"
coll="$work/ansible_collections/stock_monitoring/db"
rm -rf "$work"
mkdir -p "$coll/plugins/modules" "$coll/plugins/module_utils" "$coll/meta" "$coll/tests/sanity"
cp "$root"/library/*.py "$coll/plugins/modules/"
cp "$root"/module_utils/*.py "$coll/plugins/module_utils/"
# Our module_utils import as ansible.module_utils.<name> (ansible.cfg module_utils); in a collection
# they live under the collection's own name.
sed -i 's/ansible\.module_utils\.pg_migrate_/ansible_collections.stock_monitoring.db.plugins.module_utils.pg_migrate_/' \
  "$coll"/plugins/modules/*.py "$coll"/plugins/module_utils/*.py
printf 'namespace: stock_monitoring\nname: db\nversion: 1.0.0\nreadme: README.md\nauthors: [Stock Monitoring team]\n' > "$coll/galaxy.yml"
printf 'requires_ansible: ">=2.17"\n' > "$coll/meta/runtime.yml"
touch "$coll/README.md"
# The license is ours to choose (MIT): the GPLv3 header check does not apply. pg_migrate's `_`-prefixed
# options are internal, set by its action plugin only, and undocumented as Ansible's own copy module's
# _original_basename is (ansible-core ignores the same check for it).
for f in "$coll"/plugins/modules/*.py; do
  printf 'plugins/modules/%s validate-modules:missing-gplv3-license\n' "$(basename "$f")"
done > "$coll/tests/sanity/ignore-2.19.txt"
printf 'plugins/modules/pg_migrate.py validate-modules:undocumented-parameter\n' >> "$coll/tests/sanity/ignore-2.19.txt"

cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
# The pip version that ansible-test bootstraps (24.2 for ansible-core 2.19) names the cached script.
pip_version=$(python -c 'import ansible_test._internal.python_requirements as r, inspect, re
print(re.search(r"pip=.([0-9.]+).", inspect.getsource(r)).group(1))')
cat > "$cache/get_pip_${pip_version//./_}.py" <<'PY'
# Stand-in for get-pip.py (offline): pip from ensurepip, then the requested packages from the index.
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])
PY

cd "$coll"
git init -q . && git add -A && git -c user.name=ci -c user.email=ci@localhost commit -qm modules
ansible-test sanity --test validate-modules --python "$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" --requirements
