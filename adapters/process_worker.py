"""A user's runner.py in its own process, so its crashes, hangs and memory blow-ups cost one
request, never the server.

Parent side: RunnerProcess starts `python process_worker.py` (this file, run by path so the child
imports nothing of the server), talks to it over a socketpair with multiprocessing's Connection
(pickled tuples), and turns every way the child can fail into a RunnerFailure with a `kind`:
"init" (runner.py or init() failed), "error" (the runner raised), "memory" (MemoryError, usually
the RLIMIT_AS limit), "crashed" (the process died) or "timeout" (silent for `timeout` seconds; the
process is killed). The caller restarts the process after the last three.

Child side: main() loads runner.py from the folder, calls init(config) and serves requests:
    ("infer", messages, params) -> ("piece", text) / ("info", dict) items, then ("end", dict | None)
                                   or ("error", ...)
    ("call", name, args)        -> ("result", value) or ("error", ...)
    ("cancel",)                 -> stops the running infer between two pieces
    ("exit",)                   -> leaves
This module uses the standard library only (plus PyYAML for config.yaml)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunnerFailure", "RunnerProcess", "LAB_FUNCTIONS", "main"]

log = logging.getLogger("omniloader.runner")

LAB_FUNCTIONS = ("tokenize", "detokenize", "trace", "causal_test", "train_target", "diagnostics")
POLL = 0.1  # seconds between checks of the cancel flag and the child's health while waiting


class RunnerFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- parent side -----------------------------------------------------------------------------

class RunnerProcess:
    """One child process running one runner.py. Not thread-safe: one owner thread (the model's
    worker) drives it, one request at a time."""

    def __init__(self, folder: Path, *, timeout: float = 60.0, start_timeout: float = 120.0,
                 max_memory: int | None = None, name: str = "runner process") -> None:
        self.folder = Path(folder)
        self.timeout, self.start_timeout, self.max_memory, self.name = timeout, start_timeout, max_memory, name
        self.functions: list[str] = []
        self.pid: int | None = None
        self.starts = 0  # how many processes were started (restarts = starts - 1)
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._ready = False

    # lifecycle
    def start(self) -> None:
        """Spawn the child (returns at once; wait_ready() waits for init to finish)."""
        from multiprocessing.connection import Connection

        self.kill()
        parent_sock, child_sock = socket.socketpair()
        args = [sys.executable, __file__, "--fd", str(child_sock.fileno()), "--folder", str(self.folder),
                "--max-memory", str(self.max_memory or 0)]
        try:
            self._proc = subprocess.Popen(args, pass_fds=(child_sock.fileno(),), cwd=self.folder,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self.pid, self._ready = self._proc.pid, False
        self.starts += 1

    def wait_ready(self) -> None:
        msg = self._recv(time.monotonic() + self.start_timeout, phase="init")
        if msg[0] == "init_error":
            self.kill()
            log.warning("runner.py in %s failed to start:\n%s", self.folder, msg[2])
            raise RunnerFailure("init", msg[1])
        self.functions, self._ready = list(msg[1]["functions"]), True

    def ensure(self) -> None:
        """A live, initialized child: (re)started if it is gone."""
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        if not self._ready:
            self.wait_ready()

    def restart(self) -> None:
        """Kill the child and spawn a fresh one now; its init runs while the caller goes on."""
        self.start()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        if self.alive():
            try:
                self._conn.send(("exit",))
                self._proc.wait(timeout=grace)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        proc, self._proc, self._ready = self._proc, None, False
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: anything it spawned goes too
            except (ProcessLookupError, PermissionError):
                proc.kill()
        if proc is not None:
            proc.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # requests
    def infer(self, messages: list[dict], params: dict, cancel: threading.Event) -> Iterator[tuple[str, Any]]:
        """("piece", text) and ("info", dict) items, then one ("end", dict | None). Closing the
        iterator early cancels the runner."""
        self.ensure()
        self._conn.send(("infer", messages, params))
        finished = False
        try:
            while True:
                msg = self._recv(time.monotonic() + self.timeout, cancel=cancel)
                if msg is None:  # cancelled: the finally block tells the child
                    return
                if msg[0] in ("piece", "info"):
                    yield msg
                    continue
                finished = True
                if msg[0] == "end":
                    yield msg
                    return
                raise self._error(msg)
        finally:
            if not finished:
                self._cancel()

    def call(self, name: str, *args: Any) -> Any:
        self.ensure()
        self._conn.send(("call", name, args))
        msg = self._recv(time.monotonic() + self.timeout)
        if msg[0] == "result":
            return msg[1]
        raise self._error(msg)

    def _cancel(self) -> None:
        """Stop the child's current infer and read up to its end, keeping the protocol in step;
        a child that does not stop within the timeout is killed."""
        if not self.alive():
            return
        try:
            self._conn.send(("cancel",))
            deadline = time.monotonic() + self.timeout
            while self._recv(deadline)[0] in ("piece", "info"):
                pass
        except RunnerFailure:
            self.kill()  # the next request starts a fresh process
        except OSError:
            self.kill()

    def _error(self, msg: tuple) -> RunnerFailure:
        if msg[0] == "fatal":  # the child reported, then exited
            self.kill()
            return RunnerFailure(msg[1], msg[2])
        if len(msg) > 3:
            log.warning("runner.py in %s raised:\n%s", self.folder, msg[3])
        return RunnerFailure("error", msg[2] if len(msg) > 2 else str(msg))

    def _recv(self, deadline: float, cancel: threading.Event | None = None, phase: str = "request") -> tuple | None:
        while True:
            try:
                if self._conn.poll(max(0.0, min(POLL, deadline - time.monotonic()))):
                    return self._conn.recv()
            except (EOFError, OSError):
                raise self._died(phase) from None
            if cancel is not None and cancel.is_set():
                return None
            if self._proc.poll() is not None:
                raise self._died(phase)
            if time.monotonic() >= deadline:
                limit = self.start_timeout if phase == "init" else self.timeout
                self.kill()
                raise RunnerFailure("timeout", f"the {self.name} did not answer within {limit:g} s and was killed")

    def _died(self, phase: str) -> RunnerFailure:
        proc, code = self._proc, None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # it closed the socket but lives on: it goes now
                pass
        self.kill()
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            if code == -signal.SIGKILL:
                how += " (out of memory?)"
        else:
            how = f"exited with code {code}"
        return RunnerFailure("init" if phase == "init" else "crashed", f"the {self.name} {how} during "
                             + ("init()" if phase == "init" else "the request"))


# --- child side ------------------------------------------------------------------------------

def _watch_parent() -> None:
    """Leave when the server goes away, even while user code is busy."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _load_runner(folder: Path):
    import importlib.util

    import yaml

    path = folder / "runner.py"
    sys.path.insert(0, str(folder))  # the runner may import its own helper modules
    spec = importlib.util.spec_from_file_location("runner", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["runner"] = module
    spec.loader.exec_module(module)
    config_path = folder / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise TypeError(f"{config_path} must hold a mapping, not {type(config).__name__}")
    config.setdefault("root", str(folder))
    return module, config


def _fatal(conn, kind: str, message: str) -> None:
    try:
        conn.send(("fatal", kind, message))
    finally:
        os._exit(3)


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}{f': {exc}' if str(exc) else ''}{at}"


def _infer(conn, runner, messages: list, params: dict) -> None:
    out = runner.infer(messages, params)
    pieces = iter([out] if isinstance(out, str) else out)
    info = None
    while True:
        try:
            piece = next(pieces)
        except StopIteration as stop:
            info = stop.value if isinstance(stop.value, dict) else None
            break
        conn.send(("info", piece) if isinstance(piece, dict) else ("piece", str(piece)))
        if conn.poll():
            msg = conn.recv()
            if msg[0] in ("cancel", "exit"):
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                if msg[0] == "exit":
                    os._exit(0)
                break
    conn.send(("end", info))


def _serve(conn, runner) -> int:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return 0
        kind = msg[0]
        if kind == "exit":
            return 0
        try:
            if kind == "infer":
                _infer(conn, runner, msg[1], msg[2])
            elif kind == "call":
                fn = getattr(runner, msg[1], None)
                if msg[1] not in LAB_FUNCTIONS or not callable(fn):
                    raise AttributeError(f"runner.py has no function `{msg[1]}`")
                conn.send(("result", fn(*msg[2])))
            # a "cancel" that arrives after its request ended is stale: nothing to stop
        except MemoryError as exc:
            _fatal(conn, "memory", f"runner ran out of memory: {_describe(exc)}")
        except Exception as exc:  # user code failed: that request gets the error, the process lives on
            conn.send(("error", "error", _describe(exc), traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    import argparse
    from multiprocessing.connection import Connection

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--max-memory", type=int, default=0)
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    os.dup2(2, 1)  # the runner's prints land in the server's log, never in the protocol
    _watch_parent()
    if args.max_memory:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (args.max_memory, args.max_memory))
    try:
        runner, config = _load_runner(args.folder.resolve())
        if not callable(getattr(runner, "infer", None)):
            raise AttributeError("runner.py defines no infer(messages, params)")
        if callable(getattr(runner, "init", None)):
            runner.init(config)
    except BaseException as exc:  # noqa: BLE001 - whatever user code raised, the server hears why
        conn.send(("init_error", _describe(exc), traceback.format_exc()))
        return 1
    functions = [name for name in LAB_FUNCTIONS if callable(getattr(runner, name, None))]
    conn.send(("ready", {"functions": functions, "pid": os.getpid()}))
    return _serve(conn, runner)


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (adapters/) is not the runner's business
    sys.exit(main())
