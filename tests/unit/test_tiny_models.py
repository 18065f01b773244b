"""tests/tiny_models.py builds a loadable, deterministic tiny llama GGUF."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.tiny_models import FastGGUFReader, write_tiny_llama_gguf

VOCAB = 49152  # SmolLM2's tokenizer, copied into the tiny model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_header_fields(tiny):
    fields = FastGGUFReader(tiny).fields  # a gguf.GGUFReader, ~3x faster on big vocabularies
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.name"].contents() == "tiny-llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.embedding_length"].contents() == 64
    assert fields["llama.context_length"].contents() == 512
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert 10e6 < tiny.stat().st_size < 25e6


def test_loads_and_generates_deterministically(tiny):
    from adapters.llama_cpp import open_llama

    llm = open_llama(str(tiny), n_ctx=256, verbose=False)
    try:
        assert llm.n_vocab() == VOCAB
        assert llm.n_ctx() == 256
        outs = [llm.create_completion("Hello", max_tokens=8, temperature=0) for _ in range(2)]
        assert outs[0]["choices"][0]["text"] == outs[1]["choices"][0]["text"]
        first = outs[0]
        assert first["usage"]["completion_tokens"] == 8 or first["choices"][0]["finish_reason"] == "stop"
    finally:
        llm.close()


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    again = write_tiny_llama_gguf(tmp_path / "again.gguf")
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    assert _sha256(again) == _sha256(tiny)
    assert _sha256(other) != _sha256(tiny)
