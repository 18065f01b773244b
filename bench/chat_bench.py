"""Server vs raw engine on the default model, measured in one run.

    python bench/chat_bench.py [--tokens 128] [--runs 9] [--streams 8] [--threads N] [--peer]

- raw: `llama_cpp.Llama.create_chat_completion(stream=True)` in this process (GGUF chat template).
- omniloader: `omniloader serve` in a subprocess, streamed /v1/chat/completions, same prompt/settings.
  Raw and server runs alternate, so drift on a shared machine hits both alike; medians are printed
  with their ratio. Then `--streams` concurrent streams: aggregate tokens/s and streams completed.
- --peer: the same through llama-cpp-python's bundled server (`python -m llama_cpp.server`).
Every run is greedy with end-of-sequence banned, so each produces exactly `--tokens` tokens.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.llama_cpp import open_llama  # noqa: E402  the same safe buffer choice the server makes
from server.registry import Registry  # noqa: E402

SETTLE = 0.5  # seconds between runs: llama.cpp's OpenMP threads spin for a while after each call
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
EVENT_END = re.compile(rb"\r?\n\r?\n")  # sse-starlette (the peer) ends events with CRLF
HAS_CONTENT = re.compile(rb'"content": ?"[^"]')
HAS_FINISH_OR_USAGE = re.compile(rb'"finish_reason": ?"|"usage": ?\{')
PEER = ("import sys, runpy; from adapters.llama_cpp import plain_cpu_buffers; keep = plain_cpu_buffers(); "
        "keep.__enter__(); sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")


class RawEngine:
    """The reference: llama-cpp-python's own streaming call, no HTTP."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp
        import numpy as np

        self.llm = llm = open_llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                    verbose=False)
        self.eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)]
        eog = np.array(self.eog)

        def ban(_ids, scores):
            scores[eog] = -np.inf
            return scores

        self.processors = llama_cpp.LogitsProcessorList([ban])

    def run(self, tokens: int) -> tuple[float, float]:
        """(time to first token, decode tokens/s). The prompt's KV cache is reused, as in the server."""
        started, stamps = time.perf_counter(), []
        for _ in self.llm.create_chat_completion(MESSAGES, max_tokens=tokens, temperature=0, stream=True,
                                                 logits_processor=self.processors):
            stamps.append(time.perf_counter())
        stamps = stamps[1:-1]  # the first chunk carries only the role, the last only finish_reason
        return stamps[0] - started, (tokens - 1) / (stamps[-1] - stamps[0])


def one_stream(url: str, body: dict, tokens: int) -> dict:
    """One streamed request. The client stays lean (raw bytes; JSON decoded only for the finish and
    usage events): on 2 cores a heavy client steals time from the engine it measures."""
    body = {**body, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    client = httpx.Client(timeout=600)  # built before the clock starts: it loads CA certificates
    started, first, last, usage, done, finish, chunks, buffer = time.perf_counter(), None, None, None, False, None, 0, b""
    try:
        with client, client.stream("POST", url, json=body) as resp:
            for raw in resp.iter_raw():
                now = time.perf_counter()
                *events, buffer = EVENT_END.split(buffer + raw)
                for event in events:
                    if event == b"data: [DONE]":
                        done = True
                    elif HAS_CONTENT.search(event):
                        chunks += 1
                        first, last = first or now, now
                    if HAS_FINISH_OR_USAGE.search(event):
                        data = msgspec.json.decode(event[6:])
                        usage = data.get("usage") or usage
                        finish = next((c["finish_reason"] for c in data.get("choices", []) if c.get("finish_reason")),
                                      finish)
    except httpx.HTTPError:  # a server that cuts the stream off: counted as incomplete
        done = False
    n = usage["completion_tokens"] if usage else chunks  # a server without usage: one chunk per token
    span = (last or started) - (first or started)
    return {"ttft": (first or started) - started, "decode": (n - 1) / span if span else 0.0, "tokens": n,
            "complete": done and finish is not None}


def concurrent(url: str, body: dict, tokens: int, streams: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: one_stream(url, body, tokens), range(streams)))
    wall = time.perf_counter() - started
    return {"aggregate": sum(r["tokens"] for r in results) / wall, "complete": sum(r["complete"] for r in results),
            "wall": wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cmd: list[str], ready_path: str, log: Path):
    """A server subprocess on a free port; yields its base URL once `ready_path` answers."""
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not start; see {log}")
            try:
                if httpx.get(base + ready_path, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait()


def line(name: str, ttft: float, decode: float) -> None:
    print(f"{name:<26} decode {decode:7.1f} tok/s   TTFT {ttft * 1000:7.1f} ms")


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peer", action="store_true", help="also measure llama-cpp-python's bundled server")
    args = parser.parse_args()

    registry = Registry(REPO / "models")
    registry.scan()
    record = registry.resolve("default")
    gguf, n_ctx = record.source_path(), record.manifest.context_length or 4096
    print(f"{record.id} ({gguf.name}), {args.threads} threads, {args.tokens} tokens, median of {args.runs}")
    raw = RawEngine(gguf, args.threads, n_ctx)
    work = Path(tempfile.mkdtemp(prefix="omniloader-bench-"))
    serve = [sys.executable, "-m", "server", "serve", "--threads", str(args.threads), "--models-dir",
             str(work / "models"), "--lab-dir", str(work / "lab"), "--log-level", "warning"]

    with running(serve, "/health", work / "server.log") as base:
        url, body = base + "/v1/chat/completions", {"model": "default", "ignore_eos": True}
        raw.run(8), one_stream(url, body, 8)  # load and warm up both
        raw_runs, server_runs = [], []
        for _ in range(args.runs):  # alternate, so machine drift hits both alike
            time.sleep(SETTLE)
            raw_runs.append(raw.run(args.tokens))
            time.sleep(SETTLE)
            server = one_stream(url, body, args.tokens)
            server_runs.append((server["ttft"], server["decode"]))
        many = concurrent(url, body, args.tokens, args.streams)
    (raw_ttft, raw_decode), (ttft, decode) = median_pair(raw_runs), median_pair(server_runs)
    line("raw llama_cpp.Llama", raw_ttft, raw_decode)
    line("omniloader (HTTP, SSE)", ttft, decode)
    print(f"{'':<26} decode ratio {decode / raw_decode:.3f} x raw (target >= 0.97)   "
          f"TTFT overhead {(ttft - raw_ttft) * 1000:+.1f} ms (target <= 10)")
    print(f"{'omniloader x' + str(args.streams):<26} aggregate {many['aggregate']:7.1f} tok/s   "
          f"{many['complete']}/{args.streams} streams complete   wall {many['wall']:.1f} s")

    if args.peer:
        peer = [sys.executable, "-c", PEER, "--model", str(gguf), "--n_ctx", str(n_ctx), "--n_threads",
                str(args.threads), "--n_threads_batch", str(args.threads)]
        with running(peer, "/v1/models", work / "peer.log") as base:
            url = base + "/v1/chat/completions"
            body = {"model": "default", "logit_bias": {str(t): -100 for t in raw.eog}}  # its way to ignore EOS
            one_stream(url, body, 8)
            runs = [one_stream(url, body, args.tokens) for _ in range(args.runs)]
            many = concurrent(url, body, args.tokens, args.streams)
        line("llama_cpp.server (peer)", *median_pair([(r["ttft"], r["decode"]) for r in runs]))
        print(f"{'llama_cpp.server x' + str(args.streams):<26} aggregate {many['aggregate']:7.1f} tok/s   "
              f"{many['complete']}/{args.streams} streams complete   wall {many['wall']:.1f} s")


if __name__ == "__main__":
    main()
