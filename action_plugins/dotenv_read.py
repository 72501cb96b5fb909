# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""Controller side of dotenv_read: its result is always hidden, the task never needs `no_log`.

The result holds the values of the .env file, the password among them. With `no_log` on the task,
Ansible also hides why the host could not be reached: every SSH failure of the first remote task
(a changed host key, an unknown host, a refused login, a closed port) would read
`<error censored due to no log>`. Marking the result instead hides the values and leaves the
connection's own errors visible.
"""

from __future__ import annotations

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    def run(self, tmp: str | None = None, task_vars: dict | None = None) -> dict:
        result = super().run(tmp, task_vars)
        result.update(self._execute_module(module_name="dotenv_read", module_args=self._task.args,
                                           task_vars=task_vars))
        result["_ansible_no_log"] = True  # Ansible hides a result so marked, at any verbosity
        return result
