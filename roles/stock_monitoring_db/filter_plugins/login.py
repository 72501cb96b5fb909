# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The connection settings: the host's .env values, overridden by the role's stock_monitoring_db_postgres_*.

On the controller, as filters: the overrides (the password among them) never pass through a module's
arguments, which a module may log when its task is not no_log.
"""

from __future__ import annotations


def required(keys: list[str], overrides: dict) -> list[str]:
    """The .env keys that no role variable overrides (a null override means: take it from the .env)."""
    return [key for key in keys if overrides.get(key) is None]


def login(values: dict, overrides: dict) -> dict:
    """The .env values with the overrides that are set."""
    return {**values, **{key: value for key, value in overrides.items() if value is not None}}


def login_problem(values: dict, env_file: str) -> str:
    """What no connection can carry, named by key (never the value): a NUL character ends a C string in libpq,
    and the protocol has no way to send one. Empty when there is none."""
    keys = [key for key, value in values.items() if "\0" in str(value)]
    if not keys:
        return ""
    return (f"{', '.join(keys)} in {env_file} (or the role variable that overrides it) holds a NUL character, "
            "which no PostgreSQL connection can carry: fix the value")


class FilterModule:
    def filters(self) -> dict:
        return {"stock_monitoring_db_required": required, "stock_monitoring_db_login": login,
                "stock_monitoring_db_login_problem": login_problem}
