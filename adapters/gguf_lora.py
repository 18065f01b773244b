"""A LoRA component (safetensors in Hugging Face module names, adapters/overlay.py) as a llama.cpp
GGUF LoRA adapter, the file `llama_adapter_lora_init` loads.

What llama.cpp expects (src/llama-adapter.cpp, convert_lora_to_gguf.py):
- metadata `general.architecture` equal to the base model's, `general.type` = "adapter",
  `adapter.type` = "lora", `adapter.lora.alpha` (float32);
- for each adapted base tensor `blk.{i}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.weight`
  two tensors `<name>.lora_a` and `<name>.lora_b`. GGUF lists dimensions in reverse, so a numpy
  array [rank, n_in] is the ggml tensor {n_in, rank} that the loader checks for lora_a
  (ne[0] = the base's n_in) and [n_out, rank] is {rank, n_out} for lora_b: the safetensors A and B
  go in as they are;
- llama.cpp adds `adapter_scale * alpha / rank * (B @ (A @ x))` (rank = lora_b's ne[0]; when alpha
  is 0, just adapter_scale): `adapter_scale(...)` gives the scale to set for a wanted total scale.

The Q/K row permutation: convert_hf_to_gguf.py stores a llama model's q_proj and k_proj rows
reordered per head (each head's two rotary halves interleaved, for llama.cpp's RoPE layout);
transformers undoes it when it loads such a GGUF. A delta B @ A to q_proj/k_proj must have its rows
reordered the same way (B's rows; A acts on the input and is unchanged), with the head count of
the tensor: n_head for q, n_head_kv for k. Architectures converted without it (qwen2, gemma, ...)
take B as it is."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.overlay import LORA_MODULES, read_lora

__all__ = ["GGUF_NAMES", "PERMUTED_ARCHS", "GGUFLayout", "LoraFile", "permute_rows", "convert_lora",
           "gguf_lora_path", "ensure_gguf_lora", "adapter_scale"]

# Hugging Face module (relative to model.layers[i]) -> llama.cpp tensor name in block i.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
assert set(GGUF_NAMES) == set(LORA_MODULES)
# GGUF architectures whose q/k rows convert_hf_to_gguf.py permutes (LlamaModel with undo_permute).
PERMUTED_ARCHS = frozenset({"llama"})
FORMAT_VERSION = "1"  # bump when the converted file's layout changes: old cached files are not reused


@dataclass(frozen=True)
class GGUFLayout:
    """What a conversion depends on in the base model (read from its GGUF metadata)."""

    arch: str
    n_head: int
    n_head_kv: int
    n_layer: int
    n_embd: int

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> GGUFLayout:
        arch = meta.get("general.architecture", "llama")
        n_head = int(meta.get(f"{arch}.attention.head_count", 0) or 0)
        return cls(arch, n_head, int(meta.get(f"{arch}.attention.head_count_kv", n_head) or n_head),
                   int(meta.get(f"{arch}.block_count", 0) or 0), int(meta.get(f"{arch}.embedding_length", 0) or 0))

    @property
    def key(self) -> str:
        return f"{self.arch}-h{self.n_head}-kv{self.n_head_kv}-v{FORMAT_VERSION}"


@dataclass(frozen=True)
class LoraFile:
    """A converted adapter: its path, and the alpha and rank llama.cpp will scale it by."""

    path: Path
    alpha: float
    rank: int


def permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute on the rows of B [out, rank]."""
    out = b.shape[0]
    if n_head <= 0 or out % (2 * n_head):
        raise ValueError(f"cannot permute {out} rows for {n_head} heads")
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _alpha_rank(path: Path) -> tuple[float, int]:
    """(alpha, rank) of a LoRA component from its header: alpha from the metadata (the rank when
    absent), rank from the first lora_A's shape (the rank llama.cpp divides by)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        first = next((n for n in f.keys() if n.endswith(".lora_A")), None)
        if first is None:
            raise ValueError(f"{path}: no lora_A tensor")
        rank = int(f.get_slice(first).get_shape()[0])
    return float(meta.get("alpha", rank)), rank


def convert_lora(src: Path, dst: Path, layout: GGUFLayout) -> LoraFile:
    """Write the GGUF adapter for the LoRA safetensors `src` at `dst` (atomically: a temp file renamed)."""
    import gguf

    pairs = read_lora(src)
    if not pairs:
        raise ValueError(f"{src}: no LoRA tensors")
    ranks = {a.shape[0] for a, _b in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"{src}: tensors of different ranks {sorted(ranks)}")
    rank = ranks.pop()
    alpha = _alpha_rank(src)[0]
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=dst.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, layout.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for (layer, module), (a, b) in sorted(pairs.items()):
            if layout.n_layer and layer >= layout.n_layer:
                raise ValueError(f"{src}: layer {layer} is past the model's {layout.n_layer} layers")
            b = np.asarray(b, dtype=np.float32)
            if layout.arch in PERMUTED_ARCHS and module == "self_attn.q_proj":
                b = permute_rows(b, layout.n_head)
            elif layout.arch in PERMUTED_ARCHS and module == "self_attn.k_proj":
                b = permute_rows(b, layout.n_head_kv)
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return LoraFile(dst, alpha, rank)


def gguf_lora_path(src: Path, sha256: str, layout: GGUFLayout) -> Path:
    """Where the converted adapter of `src` (whose content hashes to sha256) is cached: beside it."""
    return src.with_name(f".{src.name}.{sha256[:16]}.{layout.key}.gguf")


def ensure_gguf_lora(src: str | Path, sha256: str, layout: GGUFLayout) -> LoraFile:
    """The converted adapter for this component and base layout, converting it on first use. A folder
    that cannot be written (a read-only aura store) gets the file in the temp folder instead."""
    src = Path(src)
    dst = gguf_lora_path(src, sha256, layout)
    if not os.access(src.parent, os.W_OK):
        dst = Path(tempfile.gettempdir()) / "omniloader-gguf-lora" / dst.name
    if dst.is_file():
        return LoraFile(dst, *_alpha_rank(src))
    return convert_lora(src, dst, layout)


def adapter_scale(scale: float, lora: LoraFile) -> float:
    """The scale to hand llama_set_adapters_lora so that the delta is scale * (B @ A): llama.cpp
    multiplies it by alpha / rank itself (unless alpha is 0)."""
    return scale * lora.rank / lora.alpha if lora.alpha else scale
