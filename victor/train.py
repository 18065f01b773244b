"""Train Victor's tiny byte-level transformer on data/*.txt and save it to weights/.

    python victor/train.py [--steps N] [--seed S] [--out DIR] [--threads T] [--config FILE]

Defaults come from config.yaml (`model:` sizes, `train:` steps, batch size, learning rate, seed);
the defaults train in well under a minute on 2 CPU cores. Writes DIR/model.safetensors and
DIR/meta.json (the model's sizes, the run's settings and its final loss). Needs torch."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from runner import META_FILE, WEIGHTS_FILE, TinyGPT, model_config, weights_dir  # noqa: E402


def corpus(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt training text in {folder}")
    return torch.tensor(list(b"\n\n".join(f.read_bytes().strip() for f in files)), dtype=torch.long)


def train(config: dict, *, steps: int, seed: int, out: Path, log_every: int = 100) -> dict:
    settings = {"batch_size": 32, "lr": 3e-3, **(config.get("train") or {})}
    torch.manual_seed(seed)
    dims = model_config(config)
    data = corpus(Path(config.get("root", ROOT)) / "data")
    model = TinyGPT(**dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=0.01)
    context, batch = dims["context"], int(settings["batch_size"])
    started, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(steps):
        lr = float(settings["lr"]) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))  # cosine decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - context - 1, (batch,))
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  ({time.perf_counter() - started:.1f}s)", flush=True)
    meta = {"model": dims, "steps": steps, "seed": seed, "loss": round(loss.item(), 4),
            "data_bytes": len(data), "seconds": round(time.perf_counter() - started, 1)}
    save(model, meta, out)
    return meta


def save(model: TinyGPT, meta: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / (WEIGHTS_FILE + ".tmp")))
    (out / (WEIGHTS_FILE + ".tmp")).replace(out / WEIGHTS_FILE)  # never half a file for a loading runner
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: config train.steps)")
    parser.add_argument("--seed", type=int, help="random seed (default: config train.seed)")
    parser.add_argument("--out", type=Path, help="weights folder (default: config weights, under victor/)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy small machine more threads wait on each other)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text()) or {}
    config.setdefault("root", str(args.config.resolve().parent))
    if args.threads:
        torch.set_num_threads(args.threads)
    train_cfg = config.get("train") or {}
    out = args.out or weights_dir(config)
    meta = train(config, steps=args.steps or int(train_cfg.get("steps", 600)),
                 seed=args.seed if args.seed is not None else int(train_cfg.get("seed", 0)), out=out)
    print(f"saved {out / WEIGHTS_FILE}: {meta['steps']} steps, loss {meta['loss']}, {meta['seconds']}s")


if __name__ == "__main__":
    main()
