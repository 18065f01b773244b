"""Server vs raw engine on the default model, measured in one run.

    python bench/chat_bench.py [--tokens 128] [--runs 3] [--streams 8] [--threads N] [--peer]

1. Raw: `llama_cpp.Llama.create_completion(stream=True)` in this process on the chat prompt's tokens.
2. OmniLoader: `omniloader serve` in a subprocess, streamed /v1/chat/completions, same prompt/settings.
   Prints decode tokens/s and time to first token for both, and their ratios.
3. N concurrent streams of `--tokens` tokens to the server: aggregate tokens/s, streams completed.
4. With --peer: the same through llama-cpp-python's bundled server (`python -m llama_cpp.server`).
Every run is greedy with end-of-sequence banned, so each produces exactly `--tokens` tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.registry import Registry  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout}s")


def raw_engine(gguf: Path, threads: int, n_ctx: int, tokens: int, runs: int):
    """(ttft seconds, decode tokens/s) per run through the raw in-process API, and the EOG token ids."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from adapters.llama_cpp import open_llama  # the same safe buffer choice the server makes

    llm = open_llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    eos = llm._model.token_get_text(llm.token_eos())
    prompt = Jinja2ChatFormatter(template, eos_token=eos, bos_token="")(messages=MESSAGES).prompt
    prompt_tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    eog = np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)])

    def ban(_ids, scores):
        scores[eog] = -np.inf
        return scores

    results = []
    for run in range(runs + 1):  # the first run warms up
        llm.reset()
        started = time.perf_counter()
        stamps = []
        for _ in llm.create_completion(prompt_tokens, max_tokens=tokens, temperature=0, stream=True,
                                       logits_processor=llama_cpp.LogitsProcessorList([ban])):
            stamps.append(time.perf_counter())
        if run:
            results.append((stamps[0] - started, (tokens - 1) / (stamps[-1] - stamps[0])))
    llm.close()
    return results, [int(t) for t in eog]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, tokens: int) -> dict:
    body = {**body, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, last, usage, done, finish, chunks = time.perf_counter(), None, None, None, False, None, 0
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = msgspec.json.decode(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    chunks += 1
                    now = time.perf_counter()
                    first = first or now
                    last = now
                finish = choice.get("finish_reason") or finish
    n = usage["completion_tokens"] if usage else chunks  # a peer without usage: one chunk per token
    return {"ttft": (first or started) - started, "decode": (n - 1) / ((last or started) - (first or started) or 1e-9),
            "tokens": n, "complete": done and finish is not None, "end": time.perf_counter()}


async def server_runs(base: str, body: dict, tokens: int, runs: int, streams: int):
    url = base + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, body, 8)  # load + warm up
        single = [await one_stream(client, url, body, tokens) for _ in range(runs)]
        started = time.perf_counter()
        many = await asyncio.gather(*(one_stream(client, url, body, tokens) for _ in range(streams)),
                                    return_exceptions=True)
        wall = time.perf_counter() - started
    ok = [m for m in many if isinstance(m, dict)]
    total_tokens = sum(m["tokens"] for m in ok)
    return single, {"aggregate": total_tokens / wall, "complete": sum(m["complete"] for m in ok),
                    "wall": wall}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def report(name: str, single: list[tuple[float, float]]) -> tuple[float, float]:
    ttft = statistics.median(s[0] for s in single) * 1000
    decode = statistics.median(s[1] for s in single)
    print(f"{name:<28} decode {decode:7.1f} tok/s   TTFT {ttft:7.1f} ms")
    return ttft, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peer", action="store_true", help="also measure llama-cpp-python's bundled server")
    args = parser.parse_args()

    registry = Registry(REPO / "models")
    registry.scan()
    record = registry.resolve("default")
    gguf, n_ctx = record.source_path(), record.manifest.context_length or 4096
    print(f"model {record.id} ({gguf.name}), threads {args.threads}, {args.tokens} tokens, median of {args.runs}")

    raw, eog = raw_engine(gguf, args.threads, n_ctx, args.tokens, args.runs)
    raw_ttft, raw_decode = report("raw llama_cpp.Llama", raw)

    work = Path(tempfile.mkdtemp(prefix="omniloader-bench-"))
    port = free_port()
    proc = start([sys.executable, "-m", "server", "serve", "--port", str(port), "--threads", str(args.threads),
                  "--models-dir", str(work / "models"), "--lab-dir", str(work / "lab"), "--log-level", "warning"],
                 work / "server.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        body = {"model": "default", "ignore_eos": True}
        single, many = asyncio.run(server_runs(f"http://127.0.0.1:{port}", body, args.tokens, args.runs, args.streams))
    finally:
        proc.terminate()
        proc.wait()
    ttft, decode = report("omniloader (HTTP, SSE)", [(s["ttft"], s["decode"]) for s in single])
    print(f"{'':<28} decode ratio {decode / raw_decode:.3f} x raw (target >= 0.97)   "
          f"TTFT overhead {ttft - raw_ttft:+.1f} ms (target <= 10)")
    print(f"{'omniloader x' + str(args.streams) + ' streams':<28} aggregate {many['aggregate']:7.1f} tok/s   "
          f"{many['complete']}/{args.streams} streams complete   wall {many['wall']:.1f} s")

    if args.peer:
        port = free_port()
        peer = ("import sys, runpy; from adapters.llama_cpp import plain_cpu_buffers; plain_cpu_buffers().__enter__(); "
                "sys.argv = ['llama_cpp.server'] + sys.argv[1:]; runpy.run_module('llama_cpp.server', run_name='__main__')")
        proc = start([sys.executable, "-c", peer, "--model", str(gguf), "--port", str(port),
                      "--n_ctx", str(n_ctx), "--n_threads", str(args.threads), "--n_threads_batch",
                      str(args.threads)], work / "peer.log")
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
            body = {"model": "default", "logit_bias": {str(t): -100 for t in eog}}  # its way to ignore EOS
            single, many = asyncio.run(server_runs(f"http://127.0.0.1:{port}", body, args.tokens, args.runs,
                                                   args.streams))
        finally:
            proc.terminate()
            proc.wait()
        report("llama_cpp.server (peer)", [(s["ttft"], s["decode"]) for s in single])
        print(f"{'llama_cpp.server x' + str(args.streams):<28} aggregate {many['aggregate']:7.1f} tok/s   "
              f"{many['complete']}/{args.streams} streams complete   wall {many['wall']:.1f} s")


if __name__ == "__main__":
    main()
