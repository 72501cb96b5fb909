"""This machine as a deploy host reached over real SSH, for the tests and make bench: an sshd of our own
on a free 127.0.0.1 port, key-only login as the non-root user smdb-deploy, its host key pinned.
Needs root (it creates the user when missing) and openssh-server (scripts/host-deps.sh)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pgcluster import free_port

DEPLOY_USER = "smdb-deploy"


class SshHost:
    """This machine as a deploy host reached over real SSH: an sshd of the tests' own on a free
    127.0.0.1 port, key-only login as the non-root user smdb-deploy, its host key pinned."""

    def __init__(self, root: Path, user: str = DEPLOY_USER) -> None:
        self.root, self.user = root, user
        self.port = free_port()
        home = Path(pwd.getpwnam(user).pw_dir)
        self.env_file = home / "stock-monitoring" / ".env"
        for name, kind in (("client_key", "ed25519"), ("host_key", "ed25519"), ("host_key_ecdsa", "ecdsa")):
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(root / name)], check=True)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.env_file.parent.mkdir(mode=0o700, exist_ok=True)
        for path in (ssh_dir, ssh_dir / "authorized_keys", self.env_file.parent):
            shutil.chown(path, user, user)
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nHostKey {root / 'host_key_ecdsa'}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            f"AllowUsers {user}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PermitRootLogin no\n")
        # Only one of its two host keys is pinned, as in a known_hosts secret that lists one.
        self.known_hosts_line = f"[127.0.0.1]:{self.port} {(root / 'host_key.pub').read_text()}"
        (root / "known_hosts").write_text(self.known_hosts_line)
        self.sshd = self.start_sshd()
        self.inventory = root / "hosts.yml"
        self.inventory.write_text(json.dumps({"stock_monitoring_db": {"hosts": {"deploy-host": {
            "ansible_host": "127.0.0.1", "ansible_port": self.port, "ansible_user": user,
            "ansible_ssh_private_key_file": str(root / "client_key"),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={root / 'known_hosts'} -o StrictHostKeyChecking=yes "
                                       f"-o ControlPath={root}/cp-%C",
            "ansible_python_interpreter": "/usr/bin/python3",
            "stock_monitoring_db_env_file": str(self.env_file)}}}}))
        deadline = time.monotonic() + 10
        while not self.listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not listen on 127.0.0.1:{self.port}: see {root / 'sshd.log'}")
            time.sleep(0.05)

    def start_sshd(self) -> subprocess.Popen:
        Path("/run/sshd").mkdir(exist_ok=True)
        return subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(self.root / "sshd_config"), "-E",
                                 str(self.root / "sshd.log")])

    def restart(self) -> None:
        """Restart the listening sshd, as a package upgrade does: the sessions it started go on."""
        self.sshd.terminate()
        self.sshd.wait(10)
        self.sshd = self.start_sshd()
        deadline = time.monotonic() + 10
        while not self.listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not listen again on 127.0.0.1:{self.port}")
            time.sleep(0.05)

    def listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def write_env(self, text: str) -> None:
        """The backend's .env on the deploy host, readable by the deploy user only."""
        self.env_file.write_text(text)
        os.chmod(self.env_file, 0o600)
        shutil.chown(self.env_file, self.user, self.user)

    def stop(self) -> None:
        self.sshd.terminate()
        self.sshd.wait(10)
        self.env_file.unlink(missing_ok=True)  # it holds the throwaway cluster's password
        subprocess.run(["pkill", "-f", f"ControlPath={self.root}/"], check=False)  # ssh masters of its runs
        shutil.rmtree(self.root, ignore_errors=True)


def start(prefix: str, user: str = DEPLOY_USER) -> SshHost:
    """Create the deploy user when missing, then start an SshHost in a new temporary directory."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
        subprocess.run(["usermod", "-p", "*", user], check=True)  # no password, but not locked
    return SshHost(Path(tempfile.mkdtemp(prefix=prefix)), user)


