"""A backend that is not one of the five plugs in without editing OmniLoader: a tiny package declares
an `omniloader.adapters` entry point, pip installs it into a folder on PYTHONPATH, and a live server
serves a model through it (issue 11, section 5).

The wheel is zipped here by hand (a wheel is a zip with a .dist-info folder), so neither a build
backend, the `wheel` package nor the network is needed; pip installs it like any other."""
import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer

NAME, VERSION = "omni_echo", "0.1.0"
ENTRY_POINTS = "[omniloader.adapters]\necho = omni_echo:EchoAdapter\n"  # what pip reads back as the entry point
PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "omni-echo"
version = "{VERSION}"

[project.entry-points."omniloader.adapters"]
echo = "omni_echo:EchoAdapter"
"""
ADAPTER = '''\
"""An OmniLoader backend that answers with the last message reversed, after the manifest's prefix."""
from adapters.base import Adapter, Capability, Delta, Usage


class EchoAdapter(Adapter):
    backend = "echo"
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION})

    def load(self, progress=None):
        self.prefix = self.manifest.params.get("prefix", "")
        if progress is not None:
            progress(1.0)

    def context_length(self):
        return self.manifest.context_length or 4096

    def tokenize(self, text, special=True):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(map(chr, ids))

    def generate(self, params, cancel):
        text = params.messages[-1]["content"] if params.messages else params.prompt
        reply = (self.prefix + text[::-1])[:params.max_tokens]
        prompt = sum(len(m["content"]) for m in params.messages) if params.messages else len(text)
        pieces = [reply[i:i + 3] for i in range(0, len(reply), 3)] or [""]
        for piece in pieces[:-1]:
            if cancel.is_set():
                return
            yield Delta(text=piece)
        yield Delta(text=pieces[-1], finish_reason="stop", usage=Usage(prompt, len(reply)))
'''
PROMPT = "Hello, plugin!"
EXPECTED = "echo: " + PROMPT[::-1]


def write_plugin(src: Path) -> Path:
    """The plugin's source tree, as its author would publish it."""
    (src / NAME).mkdir(parents=True)
    (src / NAME / "__init__.py").write_text(ADAPTER)
    (src / "pyproject.toml").write_text(PYPROJECT)
    return src


def build_wheel(src: Path, dist: Path) -> Path:
    """A py3-none-any wheel of the source tree's package, with its entry points and RECORD."""
    info = f"{NAME}-{VERSION}.dist-info"
    files = {f"{NAME}/__init__.py": (src / NAME / "__init__.py").read_bytes(),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: omni-echo\nVersion: {VERSION}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: omniloader-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n",
             f"{info}/entry_points.txt": ENTRY_POINTS.encode()}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    dist.mkdir(parents=True, exist_ok=True)
    wheel = dist / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("plugin")
    wheel = build_wheel(write_plugin(work / "src"), work / "dist")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)
    assert (target / NAME / "__init__.py").is_file() and (target / f"{NAME}-{VERSION}.dist-info").is_dir()
    models = work / "models"
    (models / "echo").mkdir(parents=True)
    (models / "echo" / "manifest.yaml").write_text(
        'id: echo-model\nbackend: echo\nsource: .\ncapabilities: [chat, completion]\nparams: {prefix: "echo: "}\n')
    (models / "ghost").mkdir()
    (models / "ghost" / "manifest.yaml").write_text("id: ghost\nbackend: no_such_engine\nsource: .\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
        live = LiveServer(work)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(plugin_server):
    from openai import OpenAI

    with OpenAI(base_url=plugin_server.base_url + "/v1", api_key="none", max_retries=0,
                _strict_response_validation=True) as c:
        yield c


def listed(server) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(server.base_url + "/api/models").json()["data"]}


def test_chat_completion_is_served_by_the_plugin(client):
    reply = client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": PROMPT}])
    assert reply.model == "echo-model"
    assert reply.choices[0].message.content == EXPECTED
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(PROMPT), len(EXPECTED))


def test_streamed_chat_completion_is_served_by_the_plugin(client):
    stream = client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": PROMPT}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == EXPECTED
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(EXPECTED)


def test_text_completion_and_max_tokens_reach_the_plugin(client):
    reply = client.completions.create(model="echo-model", prompt="abc", max_tokens=8)
    assert reply.choices[0].text == "echo: cb"  # "echo: cba" cut at 8 characters


def test_the_model_is_listed_with_its_plugin_backend(plugin_server, client):
    client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "hi"}])
    model = listed(plugin_server)["echo-model"]
    assert (model["backend"], model["state"], model["origin"]) == ("echo", "loaded", "curated")
    assert {m["id"]: m["backend"] for m in httpx.get(plugin_server.base_url + "/api/ps").json()["models"]} == {
        "echo-model": "echo"}


def test_a_manifest_naming_an_unknown_backend_is_invalid_and_names_the_known_ones(plugin_server):
    invalid = [m for m in listed(plugin_server).values() if m["state"] == "invalid"]
    assert len(invalid) == 1 and invalid[0]["manifest_path"].endswith("ghost/manifest.yaml")
    error = invalid[0]["error"]
    assert "no_such_engine" in error
    for known in ("echo", "llama_cpp", "hf_transformers", "onnx_runtime", "vllm_remote", "victor_custom"):
        assert known in error


def test_register_accepts_the_plugin_backend_and_refuses_an_unknown_one(plugin_server, tmp_path):
    url = plugin_server.base_url + "/api/models/register"
    bad = httpx.post(url, json={"id": "nope", "backend": "no_such_engine", "source": str(tmp_path)})
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["type"] == "invalid_request_error" and "no_such_engine" in error["message"]
    assert "echo" in error["message"] and "llama_cpp" in error["message"]
    good = httpx.post(url, json={"id": "echo-two", "backend": "echo", "source": str(tmp_path),
                                 "capabilities": ["chat"], "params": {"prefix": "2: "}})
    assert good.status_code == 200, good.text
    assert json.loads(good.text)["backend"] == "echo"
    reply = httpx.post(plugin_server.base_url + "/v1/chat/completions", timeout=30,
                       json={"model": "echo-two", "messages": [{"role": "user", "content": "ab"}]})
    assert reply.json()["choices"][0]["message"]["content"] == "2: ba"
