"""High availability: a streaming standby made with pg_basebackup from the machine's binaries, on
127.0.0.2 and the primary's port, as a second host of the cluster."""

from __future__ import annotations

import uuid

import pytest
from conftest import Db, env_text, play, wait_for, write_migrations


@pytest.fixture
def pair(own_cluster):
    """(primary, standby), the database deployed on the primary and replayed on the standby."""
    standby = own_cluster.standby(own_cluster.root.parent / "standby")
    yield own_cluster, standby
    standby.stop("immediate")


def deployed(tmp_path, primary, standby) -> tuple[Db, Db]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    on_primary, on_standby = Db(primary, name), Db(standby, name)
    assert play(tmp_path, on_primary).rc == 0
    wait_for(lambda: on_standby.exists() and len(on_standby.history()) == 2, "the standby to replay the deploy")
    return on_primary, on_standby


def test_deploy_and_plan_pointed_at_a_standby_say_so_and_verify_reads_it(tmp_path, pair):
    primary, standby = pair
    _, on_standby = deployed(tmp_path, primary, standby)
    folder = write_migrations(tmp_path / "m", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                              with_real=True)
    for args in ([], ["--check"]):
        res = play(tmp_path, on_standby, args=args, extra={"stock_monitoring_db_migrations_dir": str(folder)})
        assert res.rc != 0, res.output
        assert "PostgreSQL at 127.0.0.2:" in res.output and "is a read-only standby (hot standby)" in res.output
        assert "Point POSTGRES_HOST at the primary" in res.output and "SQLSTATE 25006" not in res.output
    res = play(tmp_path, on_standby, "verify-db.yml")
    assert res.rc == 0, res.output


def test_several_hosts_deploy_to_the_primary_and_after_a_failover_to_the_promoted_standby(tmp_path, pair):
    primary, standby = pair
    on_primary, on_standby = deployed(tmp_path, primary, standby)
    both = env_text(on_primary, POSTGRES_HOST="127.0.0.2,127.0.0.1")  # the standby first
    folder = write_migrations(tmp_path / "m", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                              with_real=True)
    res = play(tmp_path, on_primary, env=both, extra={"stock_monitoring_db_migrations_dir": str(folder)})
    assert res.rc == 0 and "applied: 024_more.sql" in res.output, res.output
    assert [r[0] for r in on_primary.history()] == [22, 23, 24]
    # Failover: the primary goes away, the standby is promoted; the same .env finds it.
    wait_for(lambda: len(on_standby.history()) == 3, "the standby to replay 024")
    primary.stop("immediate")
    standby.promote()
    folder = write_migrations(tmp_path / "m", {"025_after.sql": "CREATE TABLE stock_monitoring.after (id int);\n"})
    res = play(tmp_path, on_standby, env=both, extra={"stock_monitoring_db_migrations_dir": str(folder)})
    assert res.rc == 0 and "applied: 025_after.sql" in res.output, res.output
    assert [r[0] for r in on_standby.history()] == [22, 23, 24, 25]


def test_verify_given_several_hosts_reads_the_primary_not_a_lagging_standby(tmp_path, pair):
    primary, standby = pair
    on_primary, on_standby = deployed(tmp_path, primary, standby)
    on_standby.query("SELECT pg_wal_replay_pause()")  # the standby falls behind
    folder = write_migrations(tmp_path / "m", {"024_more.sql": "CREATE TABLE stock_monitoring.more (id int);\n"},
                              with_real=True)
    extra = {"stock_monitoring_db_migrations_dir": str(folder)}
    assert play(tmp_path, on_primary, extra=extra).rc == 0
    both = env_text(on_primary, POSTGRES_HOST="127.0.0.2,127.0.0.1")  # the standby first
    res = play(tmp_path, on_primary, "verify-db.yml", env=both, extra=extra)
    assert res.rc == 0, res.output
    # Alone, the standby is still read: verify reports what it has.
    res = play(tmp_path, on_standby, "verify-db.yml", extra=extra)
    assert res.rc != 0 and "pending migrations: 024_more.sql" in res.output, res.output


def test_a_first_deploy_given_the_standby_first_creates_the_database_on_the_primary(tmp_path, pair):
    primary, _standby = pair
    on_primary = Db(primary, f"t_{uuid.uuid4().hex[:10]}")
    both = env_text(on_primary, POSTGRES_HOST="127.0.0.2,127.0.0.1")  # the standby first, no database yet
    res = play(tmp_path, on_primary, args=["--check"], env=both)
    assert res.rc == 0 and "database: would be created" in res.output, res.output
    res = play(tmp_path, on_primary, env=both)
    assert res.rc == 0 and "database: created" in res.output, res.output
    assert [r[0] for r in on_primary.history()] == [22, 23]
    res = play(tmp_path, on_primary, "verify-db.yml", env=both)
    assert res.rc == 0, res.output
