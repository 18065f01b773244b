"""One lock for the process-global state that loads patch or set: llama.cpp's default model params
(model_params), gguf's reader (fast_gguf_reads) and torch's thread count. The pool already loads
one instance at a time; this lock also covers what opens a model outside the pool's load lock
(llama.cpp's embedding context on first use, raw open_llama calls in tests and benches), so no two
patches ever overlap, whoever calls them."""
from __future__ import annotations

import threading

__all__ = ["PATCH_LOCK"]

PATCH_LOCK = threading.RLock()  # reentrant: open_llama holds it while model_params takes it again
