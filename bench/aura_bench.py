"""What serving auras costs on the default model (llama_cpp), measured in one run.

    python bench/aura_bench.py [--before /path/to/checkout] [--tokens 64] [--runs 7] [--threads N]

1. No aura: decode tokens/s and time to first token of plain `default` requests on this checkout's
   server, and (with --before, a checkout without auras, e.g. the main branch) on that one's:
   runs alternate between the two servers, medians and their ratio are printed.
2. Auras (LoRA on mlp.down_proj of 4 layers, rank 4, like a teach job's): time to first token for
   - the first request of an aura (its LoRA converted to GGUF and loaded by llama.cpp),
   - the same aura again (adapters set already, prompt KV cache reused),
   - a switch to an aura used before (in the LRU: set on the context, prompt recomputed),
   - `default` right after an aura (prompt recomputed: the KV cache is never shared across overlays),
   - `default` again (prompt KV cache reused).
Every run is greedy with end-of-sequence ignored, so each produces exactly `--tokens` tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from chat_bench import SETTLE, free_port, one_stream  # noqa: E402
from server.lab.auras import AuraStore  # noqa: E402
from server.registry import Registry  # noqa: E402

N_AURAS = 4


@contextmanager
def server(checkout: Path, work: Path, threads: int, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--threads", str(threads), "--models-dir",
           str(work / "models"), "--lab-dir", str(work / "lab"), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=checkout, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server in {checkout} did not start; see {log}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield base + "/v1/chat/completions"
    finally:
        proc.terminate()
        proc.wait()


def write_auras(work: Path) -> None:
    registry = Registry(work / "models", lab_dir=work / "lab")
    registry.scan()
    record = registry.resolve("default")
    job = work / "job"
    job.mkdir(parents=True)
    store = AuraStore(work / "lab" / "auras")
    for i in range(N_AURAS):
        rng = np.random.default_rng(i)
        tensors = {}
        for layer in (8, 9, 10, 11):
            tensors[f"layers.{layer}.mlp.down_proj.lora_A"] = (rng.standard_normal((4, 1536)) * 0.08).astype(np.float32)
            tensors[f"layers.{layer}.mlp.down_proj.lora_B"] = (rng.standard_normal((576, 4)) * 0.08).astype(np.float32)
        save_file(tensors, str(job / f"a{i}.safetensors"), metadata={"rank": "4", "alpha": "4"})
        store.write(f"a{i}", record, [{"kind": "lora", "file": f"a{i}.safetensors", "rank": 4, "alpha": 4.0,
                                       "modules": ["mlp.down_proj"], "layers": [8, 9, 10, 11]}], job, {})


def run(url: str, model: str, tokens: int) -> dict:
    time.sleep(SETTLE)
    return one_stream(url, {"model": model, "ignore_eos": True}, tokens)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms (median of {len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout without auras to compare plain requests with")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omniloader-aura-bench-"))
    write_auras(work)
    print(f"default model, {args.threads} threads, {args.tokens} tokens a request, {work}")

    with server(REPO, work, args.threads, work / "after.log") as after:
        with (server(args.before, work, args.threads, work / "before.log") if args.before else _none()) as before:
            for url in filter(None, (after, before)):
                run(url, "default", 8)  # load and warm up
            plain = {"after": [], "before": []}
            for _ in range(args.runs):  # alternate, so machine drift hits both alike
                plain["after"].append(run(after, "default", args.tokens))
                if before:
                    plain["before"].append(run(before, "default", args.tokens))
        for label in ("after", "before"):
            if plain[label]:
                decode = statistics.median(r["decode"] for r in plain[label])
                print(f"no aura, {label:6}: decode {decode:6.1f} tok/s   TTFT {ms([r['ttft'] for r in plain[label]])}")
        if plain["before"]:
            ratio = statistics.median(r["decode"] for r in plain["after"]) / \
                statistics.median(r["decode"] for r in plain["before"])
            print(f"decode ratio without an aura: {ratio:.3f} x the checkout before auras")

        first = [run(after, f"default+a{i}", args.tokens) for i in range(N_AURAS)]
        same, switch, base_after, base_again, decode = [], [], [], [], []
        for r in range(args.runs):
            i = r % N_AURAS
            switch.append(run(after, f"default+a{i}", args.tokens))
            same.append(run(after, f"default+a{i}", args.tokens))
            base_after.append(run(after, "default", args.tokens))
            base_again.append(run(after, "default", args.tokens))
        decode = [x["decode"] for x in switch + same]
        print(f"aura, first use (convert + load):  TTFT {ms([x['ttft'] for x in first])}")
        print(f"aura, switched to (cached):        TTFT {ms([x['ttft'] for x in switch])}")
        print(f"aura, same as the request before:  TTFT {ms([x['ttft'] for x in same])}")
        print(f"default right after an aura:       TTFT {ms([x['ttft'] for x in base_after])}")
        print(f"default after default:             TTFT {ms([x['ttft'] for x in base_again])}")
        print(f"decode with an aura (rank-4 LoRA on 4 layers): {statistics.median(decode):6.1f} tok/s")


@contextmanager
def _none():
    yield None


if __name__ == "__main__":
    main()
