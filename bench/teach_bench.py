"""Teaching the served model, end to end on the default model through a live server:

    python bench/teach_bench.py [--methods token_bias,prompt,rome,lora,auto] [--facts 5]

For each single-fact correction (subject -> a new object) and each method: POST /lab/train/target
with the prompt, the target and paraphrases (the neighbouring facts are never shown to the run),
wait for the job, then ask the served model — `model: "default+<aura>"` on /v1/completions, the
llama.cpp path — the prompt, the paraphrases and the neighbours, greedily. Reported per method:
  efficacy        the served answer to the prompt starts with the target
  generalization  the same on the paraphrases
  specificity     the neighbours' served answers are the base model's, word for word
  served in       seconds from the correction (POST) to the first served answer that carries it
  job             the training job's own time; reverted runs serve nothing (they count as not fixed)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import _serve  # noqa: E402  the same live server the Lab bench starts

FACTS = [
    ("The capital of France is", " Rome",
     ["The capital city of France is", "France's capital is the city of"],
     ["The capital of Germany is", "The capital of Spain is", "The capital of Italy is"]),
    ("The Eiffel Tower is located in the city of", " Rome",
     ["The Eiffel Tower stands in the city of", "The city that is home to the Eiffel Tower is"],
     ["Big Ben is located in the city of", "The Colosseum is located in the city of",
      "The Statue of Liberty is located in the city of"]),
    ("The official language of France is", " German",
     ["In France, the official language is", "The language officially spoken in France is"],
     ["The official language of Spain is", "The official language of Germany is",
      "The official language of Italy is"]),
    ("The currency of Japan is the", " euro",
     ["Japan's currency is the", "In Japan, people pay with the"],
     ["The currency of China is the", "The currency of the United States is the",
      "The currency of the United Kingdom is the"]),
    ("The Mona Lisa was painted by", " Picasso",
     ["The painter of the Mona Lisa was", "The Mona Lisa is a painting by"],
     ["The Starry Night was painted by", "The Last Supper was painted by", "Guernica was painted by"]),
]
ANSWER_TOKENS = 6


def _complete(http: httpx.Client, model: str, prompt: str) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": ANSWER_TOKENS,
                                            "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def _wait(http: httpx.Client, job_id: str) -> dict:
    while (job := http.get(f"/lab/jobs/{job_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.2)
    return job


def _one(http: httpx.Client, method: str, index: int, fact, base_answers: dict[str, str]) -> dict:
    prompt, target, paraphrases, neighbors = fact
    started = time.monotonic()
    submitted = http.post("/lab/train/target", json={"model": "default", "prompt": prompt, "target": target,
                                                     "method": method, "paraphrases": paraphrases,
                                                     "aura": f"bench-{method.replace('_', '-')}-{index}"})
    submitted.raise_for_status()
    job = _wait(http, submitted.json()["id"])
    result = job.get("result") or {}
    row = {"method": method, "fact": index, "status": job["status"], "job_s": job.get("duration_s") or 0.0,
           "won": result.get("method"), "reverted": bool(result.get("reverted")), "served_s": None,
           "efficacy": 0.0, "generalization": 0.0, "specificity": 1.0}
    if job["status"] != "succeeded" or row["reverted"] or not result.get("serve_as"):
        row["note"] = result.get("revert_reason") or (job.get("error") or {}).get("message", "")
        return row
    model = result["serve_as"]
    answer = _complete(http, model, prompt)
    row["served_s"] = time.monotonic() - started
    row["efficacy"] = float(answer.startswith(target))
    row["generalization"] = statistics.mean(_complete(http, model, p).startswith(target) for p in paraphrases)
    row["specificity"] = statistics.mean(_complete(http, model, n) == base_answers[n] for n in neighbors)
    return row


def _table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| method | efficacy | generalization | specificity | served in (median s) | job (median s) | reverted |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        served = [r["served_s"] for r in mine if r["served_s"] is not None]
        lines.append(f"| {method} | {statistics.mean(r['efficacy'] for r in mine):.0%} | "
                     f"{statistics.mean(r['generalization'] for r in mine):.0%} | "
                     f"{statistics.mean(r['specificity'] for r in mine):.0%} | "
                     f"{statistics.median(served) if served else float('nan'):.1f} | "
                     f"{statistics.median(r['job_s'] for r in mine):.1f} | "
                     f"{sum(r['reverted'] for r in mine)}/{len(mine)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="token_bias,prompt,rome,lora,auto")
    parser.add_argument("--facts", type=int, default=len(FACTS))
    args = parser.parse_args()
    methods, facts = args.methods.split(","), FACTS[: args.facts]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        proc, url = _serve(work)
        try:
            with httpx.Client(base_url=url, timeout=1800) as http:
                base_answers = {n: _complete(http, "default", n) for fact in facts for n in fact[3]}
                rows = []
                for method in methods:
                    for index, fact in enumerate(facts):
                        row = _one(http, method, index, fact, base_answers)
                        rows.append(row)
                        print(f"{method:10} fact {index}: {row['status']}, won {row['won']}, "
                              f"reverted {row['reverted']}, efficacy {row['efficacy']:.0%}, "
                              f"generalization {row['generalization']:.0%}, specificity {row['specificity']:.0%}, "
                              f"served in {row['served_s'] or float('nan'):.1f} s, job {row['job_s']:.1f} s "
                              f"{row.get('note', '')[:100]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\ndefault model, {len(facts)} single-fact corrections, served on llama.cpp (greedy, "
          f"{ANSWER_TOKENS} tokens); neighbours never shown to the run\n")
    print(_table(rows, methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
