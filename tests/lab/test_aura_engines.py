"""An aura's in-model components applied by the engines (adapters/llama_overlay.py, gguf_lora.py,
torch_overlay.py) agree with the same change made by hand in torch.

One tiny random llama GGUF (f16 matrices, 4 layers, 4 heads / 2 KV heads) is served by llama.cpp and
loaded into torch by transformers (which undoes the GGUF's q/k row permutation), so both run the
same weights. Tolerance: llama.cpp multiplies f16 weights by activations rounded to f16 while torch
runs float32, so logits differ by ~2-3e-4 (measured: base 2.4e-4, LoRA 3.4e-4, steering 1.4e-4);
TOL = 2e-3 leaves margin on other CPUs and is ~200x smaller than the changes the components make
(0.4-1.0) and than the error of a LoRA converted without the q/k permutation (0.39)."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")

import adapters.gguf_lora as gguf_lora  # noqa: E402
from adapters import create_adapter  # noqa: E402
from adapters.base import GenerateParams  # noqa: E402
from adapters.errors import InvalidInput, Unsupported  # noqa: E402
from adapters.overlay import EngineOverlay, LoraWeights, SteeringVector, file_sha256, refuse_overlay  # noqa: E402
from server.registry import Manifest, ModelRecord  # noqa: E402
from tests.tiny_models import write_tiny_llama_gguf  # noqa: E402

TOL = 2e-3
PROMPT = "The capital of France is a city where people"
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}


def _adapter(backend: str, gguf: Path, **params):
    manifest = Manifest(id=f"tiny-{backend}", backend=backend, source=str(gguf), context_length=256, params=params)
    adapter = create_adapter(ModelRecord(id=manifest.id, origin="curated", manifest=manifest, manifest_path=None))
    adapter.load()
    return adapter


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("aura-tiny") / "tiny.gguf", n_layer=4, seed=3)


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    adapter = _adapter("llama_cpp", tiny_gguf, aura_cache=2)
    yield adapter
    adapter.unload()


@pytest.fixture(scope="module")
def hf(tiny_gguf):
    adapter = _adapter("hf_transformers", tiny_gguf)
    yield adapter
    adapter.unload()


def _lora(folder: Path, modules: dict[str, list[int]], seed: int, *, rank: int = 2, alpha: float = 4.0,
          std: float = 0.5) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, layers in modules.items():
        out, inp = SHAPES[module]
        for layer in layers:
            tensors[f"layers.{layer}.{module}.lora_A"] = (rng.standard_normal((rank, inp)) * std).astype(np.float32)
            tensors[f"layers.{layer}.{module}.lora_B"] = (rng.standard_normal((out, rank)) * std).astype(np.float32)
    path = folder / f"lora-{seed}.safetensors"
    save_file(tensors, str(path), metadata={"rank": str(rank), "alpha": str(alpha)})
    return path, tensors


def _llama_logits(llama, overlay) -> np.ndarray:
    """Next-token logits for PROMPT through the adapter's own generate() (one token, greedy)."""
    list(llama.generate(GenerateParams(prompt=PROMPT, max_tokens=1, temperature=0.0, overlay=overlay),
                        threading.Event()))
    llm = llama._llm
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def _torch_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()


def _merged(model, tensors: dict, scale: float):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, a in tensors.items():
            if name.endswith(".lora_A"):
                _layers, layer, module = name.removesuffix(".lora_A").split(".", 2)
                b = tensors[name.replace("lora_A", "lora_B")]
                merged.model.layers[int(layer)].get_submodule(module).weight += scale * torch.tensor(b) @ torch.tensor(a)
    return merged


def test_lora_gives_the_same_logits_on_llama_cpp_as_merged_in_torch(llama, hf, tmp_path):
    ids = llama.prompt_tokens(GenerateParams(prompt=PROMPT))
    model = hf.torch_handle().model
    base_llama, base_torch = _llama_logits(llama, None), _torch_logits(model, ids)
    assert np.abs(base_llama - base_torch).max() < TOL  # the two engines agree on the base model
    modules = {"self_attn.q_proj": [1], "self_attn.k_proj": [1], "mlp.down_proj": [1]}
    path, tensors = _lora(tmp_path, modules, seed=0)
    scale = 0.7
    overlay = EngineOverlay("l", loras=(LoraWeights(str(path), file_sha256(path), scale),))
    want = _torch_logits(_merged(model, tensors, scale), ids)
    got = _llama_logits(llama, overlay)
    assert np.abs(want - base_torch).max() > 0.2  # the LoRA changes the logits a lot...
    assert np.abs(got - want).max() < TOL  # ...and llama.cpp makes exactly that change
    assert list(np.argsort(-got)[:5]) == list(np.argsort(-want)[:5])
    with hf._overlays.applied(overlay):  # hf_transformers applies it with hooks: the numbers of the merged weights
        assert np.abs(_torch_logits(model, ids) - want).max() < 1e-4
    assert np.array_equal(_torch_logits(model, ids), base_torch)  # hooks gone afterwards
    assert np.array_equal(_llama_logits(llama, None), base_llama)  # llama.cpp back to the base, cache reset


def test_every_module_at_once(llama, hf, tmp_path):
    """All seven LoRA modules over three layers: the change is larger and so are the activations llama.cpp
    rounds to f16 (error ~0.5% of the change, measured 4.5e-3 of 0.86): the bound is 2% of the change."""
    ids = llama.prompt_tokens(GenerateParams(prompt=PROMPT))
    model = hf.torch_handle().model
    modules = {"self_attn.q_proj": [1], "self_attn.k_proj": [1], "mlp.down_proj": [1], "self_attn.v_proj": [2],
               "self_attn.o_proj": [2], "mlp.gate_proj": [3], "mlp.up_proj": [3]}
    path, tensors = _lora(tmp_path, modules, seed=5)
    overlay = EngineOverlay("all", loras=(LoraWeights(str(path), file_sha256(path), 0.7),))
    want, base = _torch_logits(_merged(model, tensors, 0.7), ids), _torch_logits(model, ids)
    got = _llama_logits(llama, overlay)
    change = np.abs(want - base).max()
    assert change > 0.2 and np.abs(got - want).max() < 0.02 * change
    assert np.argmax(got) == np.argmax(want)


def test_q_and_k_need_the_row_permutation(llama, hf, tmp_path, monkeypatch):
    """Converted without permuting q_proj/k_proj rows, the same LoRA is far off: the test above proves it."""
    ids = llama.prompt_tokens(GenerateParams(prompt=PROMPT))
    path, tensors = _lora(tmp_path, {"self_attn.q_proj": [1], "self_attn.k_proj": [1]}, seed=1)
    want = _torch_logits(_merged(hf.torch_handle().model, tensors, 1.0), ids)
    right = _llama_logits(llama, EngineOverlay("r", loras=(LoraWeights(str(path), file_sha256(path), 1.0),)))
    monkeypatch.setattr(gguf_lora, "PERMUTED_ARCHS", frozenset())
    monkeypatch.setattr(gguf_lora, "FORMAT_VERSION", "test-unpermuted")
    wrong_path = tmp_path / "unpermuted.safetensors"
    wrong_path.write_bytes(path.read_bytes())
    wrong = _llama_logits(llama, EngineOverlay("w", loras=(LoraWeights(str(wrong_path), "0" * 63 + "1", 1.0),)))
    assert np.abs(right - want).max() < TOL
    assert np.abs(wrong - want).max() > 50 * TOL


def test_steering_gives_the_same_logits_on_llama_cpp_as_a_torch_hook(llama, hf, tmp_path):
    ids = llama.prompt_tokens(GenerateParams(prompt=PROMPT))
    model = hf.torch_handle().model
    vector = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    path = tmp_path / "steer.safetensors"
    save_file({"vector": vector}, str(path), metadata={"layer": "2"})
    layer, scale = 2, 1.5

    def add(_module, _inputs, output):
        return (output[0] + scale * torch.tensor(vector), *output[1:]) if isinstance(output, tuple) \
            else output + scale * torch.tensor(vector)

    handle = model.model.layers[layer].register_forward_hook(add)
    try:
        want = _torch_logits(model, ids)
    finally:
        handle.remove()
    base = _torch_logits(model, ids)
    overlay = EngineOverlay("s", steering=(SteeringVector(str(path), file_sha256(path), layer, scale),))
    got = _llama_logits(llama, overlay)
    assert np.abs(want - base).max() > 0.2
    assert np.abs(got - want).max() < TOL
    with hf._overlays.applied(overlay):
        assert np.abs(_torch_logits(model, ids) - want).max() < 1e-5
    assert np.abs(_llama_logits(llama, None) - base).max() < TOL  # cleared again


def test_llama_cpp_refuses_steering_after_layer_0_and_hf_applies_it(llama, hf, tmp_path):
    path = tmp_path / "steer0.safetensors"
    save_file({"vector": np.ones(64, dtype=np.float32)}, str(path))
    overlay = EngineOverlay("s0", steering=(SteeringVector(str(path), file_sha256(path), 0, 1.0),))
    with pytest.raises(InvalidInput, match="layer 0"):
        _llama_logits(llama, overlay)
    assert len(_llama_logits(llama, None)) == llama._llm.n_vocab()  # the model keeps serving
    out = list(hf.generate(GenerateParams(prompt=PROMPT, max_tokens=2, temperature=0.0, overlay=overlay),
                           threading.Event()))
    assert out[-1].finish_reason is not None


def test_lru_keeps_at_most_the_configured_adapters_and_reuses_conversions(llama, tmp_path):
    paths = [_lora(tmp_path, {"mlp.down_proj": [0]}, seed=10 + i, std=0.1)[0] for i in range(4)]
    overlays = [EngineOverlay(f"o{i}", loras=(LoraWeights(str(p), file_sha256(p), 1.0),)) for i, p in enumerate(paths)]
    for overlay in overlays:
        _llama_logits(llama, overlay)
        assert llama.overlay_cache_size() <= 2  # aura_cache=2 in the manifest
    assert llama.overlay_cache_size() == 2
    converted = sorted(tmp_path.glob(".lora-1*.gguf"))
    assert len(converted) == 4
    stamps = [p.stat().st_mtime_ns for p in converted]
    first = _llama_logits(llama, overlays[0])  # evicted earlier: loaded again from its cached conversion
    assert [p.stat().st_mtime_ns for p in converted] == stamps
    assert np.array_equal(first, _llama_logits(llama, overlays[0]))


def test_score_prompt_and_a_stack_of_two_loras(llama, tmp_path):
    before = llama.score_prompt(PROMPT, 2)
    a, _ = _lora(tmp_path, {"mlp.up_proj": [1]}, seed=20)
    b, _ = _lora(tmp_path, {"mlp.down_proj": [2]}, seed=21)
    wa, wb = LoraWeights(str(a), file_sha256(a), 1.0), LoraWeights(str(b), file_sha256(b), 0.5)
    stacked = _llama_logits(llama, EngineOverlay("a+b", loras=(wa, wb)))
    assert not np.array_equal(stacked, _llama_logits(llama, EngineOverlay("a", loras=(wa,))))
    assert np.array_equal(stacked, _llama_logits(llama, EngineOverlay("a+b", loras=(wa, wb))))
    assert llama.score_prompt(PROMPT, 2) == before  # scoring never sees a request's leftover overlay


def test_backends_without_in_model_access_refuse_lora_and_steering():
    overlay = EngineOverlay("x", loras=(LoraWeights("/nope", "0" * 64, 1.0),))
    refuse_overlay(None, "m", "onnx_runtime")
    refuse_overlay(EngineOverlay("prompt-only"), "m", "onnx_runtime")
    with pytest.raises(Unsupported, match="`m` \\(backend vllm_remote\\).*`x`"):
        refuse_overlay(overlay, "m", "vllm_remote")
    from adapters.onnx_runtime import OnnxRuntimeAdapter
    from adapters.victor_custom import VictorCustomAdapter
    from adapters.vllm_remote import VllmRemoteAdapter

    for cls in (OnnxRuntimeAdapter, VllmRemoteAdapter, VictorCustomAdapter):
        manifest = Manifest(id="remote-ish", backend=cls.backend, source="http://127.0.0.1:9/v1")
        adapter = cls.__new__(cls)
        adapter.record, adapter.manifest = ModelRecord(id="remote-ish", origin="curated", manifest=manifest), manifest
        with pytest.raises(Unsupported, match="remote-ish"):
            next(adapter.generate(GenerateParams(prompt="x", overlay=overlay), threading.Event()))
