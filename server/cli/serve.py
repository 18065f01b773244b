"""`omniloader serve`: the OpenAI API on uvicorn (settings also from OMNILOADER_* env vars)."""
from __future__ import annotations

import argparse
import logging

__all__ = ["add_serve_parser"]


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve the OpenAI API (settings also from OMNILOADER_* env vars)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--models-dir", help="folder of model manifests and GGUF files (default models)")
    serve.add_argument("--lab-dir", help="the Lab's artifacts and job database (default lab)")
    serve.add_argument("--threads", type=int, help="CPU threads per model (default: the physical cores)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1, /api and /lab")
    serve.add_argument("--default-model", help="model id that `default` resolves to")
    serve.add_argument("--max-memory", help="memory all resident models may take, e.g. 12G (default 60%% of RAM)")
    serve.add_argument("--max-loaded", type=int, help="models resident at once at most (default 8)")
    serve.add_argument("--max-queue", type=int, help="requests waiting per model before 503 (default 32)")
    serve.add_argument("--keep-alive", help="idle time before a model unloads: 5m, 1h, 90s, -1 = forever (default 5m)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--lab-jobs-per-model", type=int, help="Lab jobs running at once on one model (default 1)")
    serve.add_argument("--lab-max-running", type=int, help="Lab jobs running at once overall (default 2)")
    serve.add_argument("--lab-max-copies", type=int, help="torch copies the Lab keeps loaded between jobs (default 1)")
    serve.add_argument("--aura-cache", type=int, help="aura LoRA adapters kept loaded per model (default 8)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import load_settings

    settings = load_settings({
        "host": args.host, "port": args.port, "models_dir": args.models_dir, "lab_dir": args.lab_dir,
        "threads": args.threads, "api_key": args.api_key, "default_model": args.default_model,
        "log_level": args.log_level, "max_memory": args.max_memory, "max_loaded": args.max_loaded,
        "max_queue": args.max_queue, "keep_alive": args.keep_alive, "lab_jobs_per_model": args.lab_jobs_per_model,
        "lab_max_running": args.lab_max_running, "lab_max_copies": args.lab_max_copies, "aura_cache": args.aura_cache,
    })
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0
