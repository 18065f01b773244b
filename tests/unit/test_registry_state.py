"""Registry state in SQLite: hashes, locks, usage; the integrity check the router runs before a load."""
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from server.errors import ModelHashMismatch
from server.registry import (
    CHUNK_SIZE,
    ModelIntegrity,
    Registry,
    RegistryState,
    aggregate_sha256,
    file_sha256,
    hash_model_files,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_aggregate(files: dict[str, bytes]) -> str:
    """The documented recipe: sha256 over `<sha256>  <relative path>` lines sorted by path."""
    lines = "".join(f"{sha(files[p])}  {p}\n" for p in sorted(files))
    return sha(lines.encode())


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_file_hash_reads_in_chunks_and_matches_hashlib(tmp_path):
    data = bytes(range(256)) * (CHUNK_SIZE // 256 * 3) + b"tail"  # three full chunks and a bit
    path = write_bytes(tmp_path / "big.bin", data)
    assert file_sha256(path) == sha(data)


def test_aggregate_hash_of_a_folder_covers_every_file_but_hidden_ones_and_manifests(tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "sub/tokenizer.json": b"tok"}
    for rel, data in files.items():
        write_bytes(tmp_path / "m" / rel, data)
    write_bytes(tmp_path / "m" / ".cache" / "lock", b"changes all the time")
    write_bytes(tmp_path / "m" / "manifest.yaml", b"id: m")
    result = hash_model_files(tmp_path / "m")
    assert result.sha256 == expected_aggregate(files)
    assert [(f.path, f.size, f.sha256) for f in result.files] == [
        (p, len(files[p]), sha(files[p])) for p in sorted(files)]
    assert aggregate_sha256([("b", "2"), ("a", "1")]) == aggregate_sha256([("a", "1"), ("b", "2")])


def test_a_single_file_model_hashes_as_its_file_name_and_content(tmp_path):
    path = write_bytes(tmp_path / "tiny.gguf", b"GGUF-ish")
    result = hash_model_files(path)
    assert result.sha256 == expected_aggregate({"tiny.gguf": b"GGUF-ish"})
    assert result.total_bytes == 8


def test_state_persists_across_connections_in_wal_mode(tmp_path):
    db = tmp_path / "lab" / "registry.sqlite3"
    state = RegistryState(db)
    state.record_verification("m", hash_model_files(write_bytes(tmp_path / "m.gguf", b"abc")), 100.0)
    state.set_lock("m", True, "e" * 64)
    state.record_use("m", 200.0)
    state.record_use("m", 300.0)
    state.record_load("m", 1.25)
    state.close()
    row = RegistryState(db).get("m")
    assert row.sha256 == expected_aggregate({"m.gguf": b"abc"}) and row.verified_at == 100.0
    assert [f.path for f in row.files] == ["m.gguf"]
    assert row.locked and row.expected_sha256 == "e" * 64
    assert (row.use_count, row.last_used, row.last_load_seconds) == (2, 300.0, 1.25)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert RegistryState(db).get("unknown") is None


def test_a_failed_write_rolls_back_its_whole_transaction(tmp_path):
    state = RegistryState(tmp_path / "registry.sqlite3")
    with pytest.raises(sqlite3.Error):
        state._write("new-model", "UPDATE model_state SET no_such_column = ? WHERE id = ?", (1,))
    assert state.get("new-model") is None  # the row insert in the same transaction was undone
    state.record_use("new-model", 1.0)
    assert state.get("new-model").use_count == 1


def test_concurrent_usage_records_are_all_counted(tmp_path):
    state = RegistryState(tmp_path / "registry.sqlite3")
    threads = [threading.Thread(target=lambda: [state.record_use("m", 1.0) for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.get("m").use_count == 100


def test_lock_pins_the_last_verified_hash_and_set_expected_repins(tmp_path):
    path = write_bytes(tmp_path / "m.gguf", b"v1")
    integrity = ModelIntegrity(RegistryState(tmp_path / "registry.sqlite3"), clock=lambda: 42.0)
    first = integrity.verify("m", path)
    assert first.ok and not first.locked and first.verified_at == 42.0
    path.write_bytes(b"v2")
    assert integrity.lock("m", path).expected_sha256 == first.sha256  # what the user verified
    changed = integrity.verify("m", path)
    assert not changed.ok and changed.sha256 == expected_aggregate({"m.gguf": b"v2"})
    repinned = integrity.lock("m", path, set_expected=True)
    assert repinned.expected_sha256 == changed.sha256 and integrity.verify("m", path).ok
    unlocked = integrity.unlock("m")
    assert not unlocked.locked and unlocked.expected_sha256 == changed.sha256
    path.write_bytes(b"v3")
    assert integrity.verify("m", path).ok  # unlocked: a change is recorded, not refused


def test_lock_without_a_verification_hashes_now(tmp_path):
    path = write_bytes(tmp_path / "m.gguf", b"fresh")
    integrity = ModelIntegrity(RegistryState(tmp_path / "registry.sqlite3"))
    state = integrity.lock("m", path)
    assert state.locked and state.expected_sha256 == expected_aggregate({"m.gguf": b"fresh"})


def registry_with_model(tmp_path) -> tuple[Registry, Path]:
    models = tmp_path / "models"
    path = write_bytes(models / "tiny.gguf", b"original weights")
    reg = Registry(models, lab_dir=tmp_path / "lab")
    reg.scan()
    return reg, path


def test_check_integrity_refuses_a_locked_model_whose_files_changed(tmp_path):
    reg, path = registry_with_model(tmp_path)
    record = reg.resolve("tiny")
    reg.check_integrity(record)  # unlocked: nothing to check
    assert reg.state.get("tiny") is None
    reg.integrity.lock("tiny", path)
    reg.check_integrity(record)  # unchanged: passes and records the verification
    assert reg.state.get("tiny").verified_at is not None
    with path.open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(ModelHashMismatch) as info:
        reg.check_integrity(record)
    exc = info.value
    expected = expected_aggregate({"tiny.gguf": b"original weights"})
    actual = expected_aggregate({"tiny.gguf": b"original weightstampered"})
    assert (exc.status_code, exc.type, exc.code) == (409, "invalid_request_error", "model_hash_mismatch")
    assert "`tiny`" in exc.message and expected[:12] in exc.message and actual[:12] in exc.message
    assert exc.body().error.code == "model_hash_mismatch"
    assert reg.state.get("tiny").sha256 == actual  # the failed check is on record


def test_usage_is_recorded_for_the_router_and_never_raises(tmp_path):
    reg, _ = registry_with_model(tmp_path)
    reg.record_use("tiny")
    reg.record_use("tiny")
    reg.record_load("tiny", 0.5)
    row = reg.state.get("tiny")
    assert (row.use_count, row.last_load_seconds) == (2, 0.5) and row.last_used > 0
    reg.state.close()
    (tmp_path / "lab" / "registry.sqlite3").unlink()
    (tmp_path / "lab").rmdir()
    (tmp_path / "lab").write_text("not a folder")  # the state cannot be opened any more
    reg.record_use("tiny")  # logged, not raised: bookkeeping never fails a request


def test_without_a_lab_dir_the_hooks_are_no_ops(tmp_path):
    reg = Registry(tmp_path)
    reg.scan()
    record = reg.resolve("default")
    reg.check_integrity(record)
    reg.record_use(record.id)
    reg.record_load(record.id, 1.0)
    assert reg.state is None and reg.integrity is None
