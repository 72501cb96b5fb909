# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Write the stock_monitoring_db role's JSON report, for every host of the run, failed and unreachable
ones included.

A callback sees every host's results, those of hosts that failed or could not be reached too, at no
task cost, and writes the file even when the run failed before the role's last task.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
name: stock_monitoring_db_report
type: aggregate
short_description: Write the JSON report of a run of the stock_monitoring_db role
description:
  - The role announces the report file of each host (its variable C(stock_monitoring_db_report_file))
    in its first task, before any connection, and each host's outcome in its last one.
  - At the end of the run this callback writes one entry per host to each announced file. The entry
    is the role's report or, for a host that failed or could not be reached before the role's last
    task, the task and the message it failed with.
  - A relative file name is taken from the directory ansible-playbook was started in.
  - The file is replaced whole (written beside it, then renamed).
requirements:
  - enabled in ansible.cfg (callbacks_enabled)
"""

import json
import os
import tempfile

from ansible.executor.stats import AggregateStats
from ansible.executor.task_result import CallbackTaskResult
from ansible.plugins.callback import CallbackBase

REQUEST = "__stock_monitoring_db_report_request"
REPORT = "__stock_monitoring_db_host_report"


def failure_entry(host: str, mode: str, task: str, message: str, unreachable: bool) -> dict:
    """The entry of a host that stopped before the role's report: what it was doing and why it stopped."""
    return {"host": host, "mode": mode, "failure": message, "failed_task": task, "unreachable": unreachable}


def write_report(path: str, entries: list[dict]) -> None:
    folder = os.path.dirname(path) or "."
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".report-", suffix=".json", delete=False,
                                     encoding="utf-8") as stream:
        json.dump(entries, stream, indent=4, sort_keys=False)
        stream.write("\n")
    os.chmod(stream.name, 0o644)  # it holds no secret; the CD workflow uploads it
    os.replace(stream.name, path)


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "stock_monitoring_db_report"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.started_in = os.getcwd()
        self.requests: dict[str, dict] = {}  # host: {"file": ..., "mode": ...}
        self.entries: dict[str, dict] = {}  # host: its report, or how it stopped

    def v2_runner_on_ok(self, result: CallbackTaskResult) -> None:
        host, facts = result.host.get_name(), result.result.get("ansible_facts", {})
        if isinstance(facts.get(REQUEST), dict):
            request = facts[REQUEST]
            # The mode of a host that stops before pg_migrate reports its own: check mode as this task ran
            # in it (--check, or check_mode set on the play or the role), as pg_migrate will.
            mode = "verify" if request.get("mode") == "verify" else ("plan" if result.task.check_mode else "deploy")
            self.requests[host] = {"file": os.path.join(self.started_in, str(request["file"])), "mode": mode}
        if isinstance(facts.get(REPORT), dict):
            self.entries[host] = facts[REPORT]

    def stopped(self, result: CallbackTaskResult, unreachable: bool) -> None:
        host = result.host.get_name()
        if host in self.requests and host not in self.entries:
            message = str(result.result.get("msg", "")) or "failed (the result is hidden by no_log)"
            self.entries[host] = failure_entry(host, self.requests[host]["mode"], result.task_name, message,
                                               unreachable)

    def v2_runner_on_failed(self, result: CallbackTaskResult, ignore_errors: bool = False) -> None:
        if not ignore_errors:
            self.stopped(result, unreachable=False)

    def v2_runner_on_unreachable(self, result: CallbackTaskResult) -> None:
        self.stopped(result, unreachable=True)

    def v2_playbook_on_stats(self, stats: AggregateStats) -> None:
        files: dict[str, list[dict]] = {}
        for host, request in self.requests.items():
            files.setdefault(request["file"], []).append(self.entries.get(host) or failure_entry(
                host, request["mode"], "", "the run ended before this host's outcome was known", False))
        for path, entries in files.items():
            try:
                write_report(path, entries)
            except OSError as exc:
                self._display.error(f"The JSON report {path} could not be written: {exc.strerror}")
