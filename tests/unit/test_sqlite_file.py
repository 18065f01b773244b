"""server.storage.sqlite_file: the schema appears on first use; a failed block changes nothing."""
import sqlite3
import threading

import pytest

from server.storage.sqlite_file import SqliteFile

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


def rows(db: SqliteFile) -> list[tuple]:
    with db.transaction() as conn:
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()


def test_creates_folder_and_schema_and_commits(tmp_path):
    db = SqliteFile(tmp_path / "deep" / "state.sqlite3", SCHEMA)
    with db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES ('a', 1)")
    # a second object on the same file (a restarted server) sees the committed row
    assert rows(SqliteFile(tmp_path / "deep" / "state.sqlite3", SCHEMA)) == [("a", 1)]


def test_a_block_that_raises_rolls_back_every_statement(tmp_path):
    db = SqliteFile(tmp_path / "state.sqlite3", SCHEMA)
    with db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES ('a', 1)")
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        conn.execute("UPDATE t SET v = 2 WHERE k = 'a'")
        conn.execute("INSERT INTO t VALUES ('a', 3)")  # duplicate key: the update above must not stick
    assert rows(db) == [("a", 1)]


def test_threads_share_one_file(tmp_path):
    db = SqliteFile(tmp_path / "state.sqlite3", SCHEMA)

    def insert(i: int) -> None:
        for j in range(20):
            with db.transaction() as conn:
                conn.execute("INSERT INTO t VALUES (?, ?)", (f"{i}-{j:02d}", j))

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rows(db)) == 80
