"""Grammar-constrained (json_schema) decoding vs free decoding through the server, same prompt.

    python bench/constrained_bench.py [--tokens 128] [--runs 5]

Both runs stream /v1/chat/completions greedily; the constrained one adds a response_format
json_schema, a grammar each sampled token is checked against (adapters/llama_grammar.py). Prints
decode tokens/s for each (median, alternating runs) and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_bench import SETTLE, one_stream, running  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
          "required": ["title", "story"], "additionalProperties": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omniloader-bench-"))
    serve = [sys.executable, "-m", "server", "serve", "--models-dir", str(work / "models"), "--lab-dir",
             str(work / "lab"), "--log-level", "warning"]
    free = {"model": "default", "ignore_eos": True}
    constrained = {"model": "default",
                   "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}}
    with running(serve, "/health", work / "server.log") as base:
        url = base + "/v1/chat/completions"
        one_stream(url, free, 8), one_stream(url, constrained, 8)  # load, warm up, compile the grammar
        rates = {"free": [], "json_schema": []}
        tokens = {"free": [], "json_schema": []}
        for _ in range(args.runs):
            for name, body in (("free", free), ("json_schema", constrained)):
                time.sleep(SETTLE)
                run = one_stream(url, body, args.tokens)
                rates[name].append(run["decode"])
                tokens[name].append(run["tokens"])
    free_rate, json_rate = statistics.median(rates["free"]), statistics.median(rates["json_schema"])
    print(f"free decoding          {free_rate:7.1f} tok/s  ({statistics.median(tokens['free']):.0f} tokens/run)")
    print(f"json_schema grammar    {json_rate:7.1f} tok/s  ({statistics.median(tokens['json_schema']):.0f} tokens/run)")
    print(f"constrained / free     {json_rate / free_rate:.3f}")


if __name__ == "__main__":
    main()
