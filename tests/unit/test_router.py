"""Router and worker logic with a fake adapter (the real engine is covered in tests/api)."""
import asyncio
import threading
import time

import pytest

from adapters.base import Adapter, Delta, GenerateParams, Usage
from server.errors import ModelLoadError, ModelNotFound
from server.registry import Registry
from server.router import ModelRouter


class FakeAdapter(Adapter):
    backend = "fake"

    def __init__(self, record, log, fail_loads=0):
        super().__init__(record)
        self.log, self.fail_loads = log, fail_loads
        self.loaded = False

    def load(self):
        self.log.append(("load", self.id, threading.current_thread().name))
        if self.fail_loads:
            raise RuntimeError("corrupt weights")
        self.loaded = True

    def unload(self):
        self.log.append(("unload", self.id))
        self.loaded = False

    def generate(self, params, cancel):
        tag = params.prompt
        self.log.append(("start", tag))
        for i in range(params.max_tokens):
            if cancel.is_set():
                break
            time.sleep(0.002)
            yield Delta(text=f"{tag}{i} ")
        self.log.append(("end", tag))
        yield Delta(finish_reason="length", usage=Usage(1, params.max_tokens))


def make_router(tmp_path, log, fail_loads=0):
    reg = Registry(tmp_path)
    reg.scan()
    failures = {"n": fail_loads}

    def factory(record):
        adapter = FakeAdapter(record, log, fail_loads=failures["n"])
        failures["n"] = max(0, failures["n"] - 1)
        return adapter

    return ModelRouter(reg, factory)


async def collect(worker, tag, n=5):
    params = GenerateParams(prompt=tag, max_tokens=n)
    return [d async for d in worker.stream(lambda a, cancel: a.generate(params, cancel))]


def test_requests_to_one_model_run_fifo_without_interleaving(tmp_path):
    log = []

    async def main():
        router = make_router(tmp_path, log)
        worker = await router.acquire("default")
        results = await asyncio.gather(*(collect(worker, t) for t in "abcd"))
        await router.close()
        return results

    results = asyncio.run(main())
    events = [e for e in log if e[0] in ("start", "end")]
    assert events == [(k, t) for t in "abcd" for k in ("start", "end")]
    assert [r[-1].finish_reason for r in results] == ["length"] * 4
    assert "".join(d.text for d in results[1]) == "b0 b1 b2 b3 b4 "


def test_concurrent_first_requests_load_the_model_once_on_its_own_thread(tmp_path):
    log = []

    async def main():
        router = make_router(tmp_path, log)
        workers = await asyncio.gather(*(router.acquire(n) for n in ("default", "smollm2", "smollm2-135m-instruct")))
        assert len({id(w) for w in workers}) == 1
        assert router.state("smollm2-135m-instruct") == "loaded"
        assert router.resident() == ["smollm2-135m-instruct"]
        await router.close()

    asyncio.run(main())
    loads = [e for e in log if e[0] == "load"]
    assert len(loads) == 1 and loads[0][2].startswith("model:")


def test_failed_load_reports_and_the_next_request_retries(tmp_path):
    log = []

    async def main():
        router = make_router(tmp_path, log, fail_loads=1)
        with pytest.raises(ModelLoadError, match="corrupt weights"):
            await router.acquire("default")
        assert router.state("smollm2-135m-instruct") == "failed"
        assert "corrupt" in router.load_error("smollm2-135m-instruct")
        worker = await router.acquire("default")
        assert router.state("smollm2-135m-instruct") == "loaded" and router.load_error("smollm2-135m-instruct") is None
        assert (await collect(worker, "x", 2))[-1].usage.completion_tokens == 2
        await router.close()

    asyncio.run(main())


def test_unknown_model_is_404_and_unload_frees_after_queued_work(tmp_path):
    log = []

    async def main():
        router = make_router(tmp_path, log)
        with pytest.raises(ModelNotFound):
            await router.acquire("nope")
        worker = await router.acquire("default")
        pending = asyncio.create_task(collect(worker, "q", 20))
        await asyncio.sleep(0.005)
        assert await router.unload("smollm2-135m-instruct") is True
        assert router.state("smollm2-135m-instruct") == "unloaded"
        result = await pending  # the queued request still completes
        assert result[-1].usage.completion_tokens == 20
        for _ in range(100):
            if ("unload", "smollm2-135m-instruct") in log:
                break
            await asyncio.sleep(0.01)
        assert ("unload", "smollm2-135m-instruct") in log
        assert await router.unload("smollm2-135m-instruct") is False

    asyncio.run(main())


def test_closing_a_stream_cancels_generation_and_skips_queued_jobs(tmp_path):
    log = []

    async def main():
        router = make_router(tmp_path, log)
        worker = await router.acquire("default")
        params = GenerateParams(prompt="long", max_tokens=10_000)
        long_stream = worker.stream(lambda a, c: a.generate(params, c))
        queued = worker.stream(lambda a, c: a.generate(GenerateParams(prompt="gone", max_tokens=3), c))
        queued.close()
        first = await anext(long_stream)
        assert first.text == "long0 "
        long_stream.close()
        started = time.perf_counter()
        assert (await collect(worker, "next", 2))[-1].finish_reason == "length"
        assert time.perf_counter() - started < 2.0
        await router.close()

    asyncio.run(main())
    assert ("start", "gone") not in log
    assert ("end", "long") not in log  # cut off mid-way, its generator closed by the worker
