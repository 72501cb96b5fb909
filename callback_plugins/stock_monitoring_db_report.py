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
  - It also writes the reviewed plan (C(stock_monitoring_db_plan_out)) of a plan run, one file with an
    entry per host (the pg_migrate plan entry and the summary of each). When a host that asked for it
    failed, no plan is written (and one left at that path from before is removed), since a plan of part
    of the inventory is not the plan that was reviewed.
requirements:
  - enabled in ansible.cfg (callbacks_enabled)
"""

import datetime
import hashlib
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


PLAN_FORMAT = "stock-monitoring-db plan"
PLAN_VERSION = 1


def plan_id(plan: dict) -> str:
    """The SHA-256 of the plan without its id, as the role's plan_file lookup checks it."""
    body = {key: value for key, value in plan.items() if key != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_plan_file(hosts: dict[str, dict], created_at: str) -> dict:
    plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "created_at": created_at, "hosts": hosts}
    return {**plan, "id": plan_id(plan)}


def write_report(path: str, entries: list[dict] | dict) -> None:
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
        self.requests: dict[str, dict] = {}  # host: {"file": ..., "plan_out": ..., "mode": ...}
        self.entries: dict[str, dict] = {}  # host: its report, or how it stopped
        self.failed: set[str] = set()

    def v2_runner_on_ok(self, result: CallbackTaskResult) -> None:
        host, facts = result.host.get_name(), result.result.get("ansible_facts", {})
        if isinstance(facts.get(REQUEST), dict):
            request = facts[REQUEST]
            # The mode of a host that stops before pg_migrate reports its own: check mode as this task ran
            # in it (--check, or check_mode set on the play or the role), as pg_migrate will.
            mode = "verify" if request.get("mode") == "verify" else ("plan" if result.task.check_mode else "deploy")
            self.requests[host] = {"mode": mode, **{key: os.path.join(self.started_in, str(request[key]))
                                                    if request.get(key) else "" for key in ("file", "plan_out")}}
        if isinstance(facts.get(REPORT), dict):
            self.entries[host] = facts[REPORT]

    def stopped(self, result: CallbackTaskResult, unreachable: bool) -> None:
        host = result.host.get_name()
        self.failed.add(host)
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
        plans: dict[str, dict[str, dict | None]] = {}
        planning: set[str] = set()  # plan files of hosts that ran in check mode
        for host, request in self.requests.items():
            entry = self.entries.get(host) or failure_entry(
                host, request["mode"], "", "the run ended before this host's outcome was known", False)
            if request["file"]:
                files.setdefault(request["file"], []).append(entry)
            if request["plan_out"]:
                whole = host not in self.failed and isinstance(entry.get("plan"), dict)
                plans.setdefault(request["plan_out"], {})[host] = \
                    {**entry["plan"], "summary": entry.get("summary", [])} if whole else None
                if request["mode"] == "plan":
                    planning.add(request["plan_out"])
        for path, entries in files.items():
            try:
                write_report(path, entries)
            except OSError as exc:
                self._display.error(f"The JSON report {path} could not be written: {exc.strerror}")
        for path, hosts in plans.items():
            self.write_plan(path, hosts, path in planning)

    def write_plan(self, path: str, hosts: dict[str, dict | None], planning: bool) -> None:
        """The plan file, when every host planned; otherwise none, and a plan left there before is removed
        when this run was a plan (a deploy given plan_out by mistake leaves the reviewed plan alone)."""
        missing = sorted(host for host, entry in hosts.items() if entry is None)
        try:
            if missing:
                if planning and os.path.lexists(path):
                    os.unlink(path)
                self._display.error(f"The plan {path} was not written: {', '.join(missing)} did not plan (see above), "
                                    "and a plan of part of the inventory is not one to review")
                return
            created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            write_report(path, make_plan_file(hosts, created))
        except OSError as exc:
            self._display.error(f"The plan {path} could not be written: {exc.strerror}")
