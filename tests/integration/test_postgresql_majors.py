"""Which PostgreSQL majors pg_migrate takes: 14 to 18 (the server-dependent tests of every file run on
each of them, see the every_major marker); an older one is refused before anything runs."""

from __future__ import annotations

import pytest
from conftest import Db, play


@pytest.mark.parametrize("mode", ["deploy", "plan", "verify"])
def test_postgresql_13_is_refused_before_anything_runs_naming_the_supported_range(tmp_path, servers, mode):
    old = servers(13)
    db = Db(old, "stock_monitoring_13")
    res = play(tmp_path, db, "verify-db.yml" if mode == "verify" else "deploy-db.yml",
               args=["--check"] if mode == "plan" else [])
    assert res.rc != 0, res.output
    assert f"PostgreSQL 13.23 at 127.0.0.1:{old.port} is not supported: pg_migrate supports PostgreSQL 14 to 18" \
        in res.output, res.output
    assert "Traceback" not in res.output and not db.exists()
