"""Pool (router) and worker logic with an injected clock, a fake memory probe and fake adapters (the
real engine is covered in tests/api)."""
import asyncio
import threading
import time

import pytest

from adapters.base import Adapter, Delta, GenerateParams, Usage
from server.errors import ClientGone, InsufficientMemory, ModelLoadError, ModelNotFound, QueueFull
from server.registry import Registry
from server.runtime import LAB, ModelPool, PoolConfig

MiB = 1 << 20


class FakeAdapter(Adapter):
    backend = "fake"

    def __init__(self, record, log, size, fail=False):
        super().__init__(record)
        self.log, self.size, self.fail = log, size, fail

    def load(self, progress=None):
        self.log.append(("load", self.id, threading.current_thread().name))
        if progress:
            progress(0.5)
        if self.fail:
            raise RuntimeError("corrupt weights")

    def unload(self):
        self.log.append(("unload", self.id))

    def memory_estimate(self):
        return self.size

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


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_router(tmp_path, log, *, sizes=None, fail=(), budget=1000 * MiB, max_loaded=8, max_queue=4,
                keep_alive=300.0, parallel=None, max_copies=1):
    """Models a, b, c (+ the built-in default) with the given sizes in MiB."""
    sizes = sizes or {"a": 100, "b": 100, "c": 100}
    for name in sizes:
        extra = f"parallel: {parallel[name]}\n" if parallel and name in parallel else ""
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "manifest.yaml").write_text(f"id: {name}\nbackend: llama_cpp\nsource: x.gguf\n{extra}")
    reg = Registry(tmp_path)
    reg.scan()
    failures = set(fail)

    def factory(record):
        broken = record.id in failures
        failures.discard(record.id)
        return FakeAdapter(record, log, sizes.get(record.id, 100) * MiB, fail=broken)

    clock = Clock()
    config = PoolConfig(max_memory=budget, max_loaded=max_loaded, max_queue=max_queue, keep_alive=keep_alive,
                        max_copies=max_copies)
    return ModelPool(reg, factory, config, clock=clock, memory_probe=lambda: 0), clock


async def run(lease, tag, n=5):
    params = GenerateParams(prompt=tag, max_tokens=n)
    try:
        return [d async for d in lease.stream(lambda a, cancel: a.generate(params, cancel))]
    finally:
        lease.release()


def test_requests_to_one_model_run_fifo_without_interleaving(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log)
        leases = [await router.acquire("a")]
        waiting = [asyncio.ensure_future(router.acquire("a")) for _ in range(3)]
        results = [await run(leases[0], "a")]
        for tag, task in zip("bcd", waiting):
            results.append(await run(await task, tag))
        await router.close()
        return results

    results = asyncio.run(main())
    events = [e for e in log if e[0] in ("start", "end")]
    assert events == [(k, t) for t in "abcd" for k in ("start", "end")]
    assert "".join(d.text for d in results[1]) == "b0 b1 b2 b3 b4 "


def test_concurrent_first_requests_load_once_on_the_models_own_thread(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log)
        names = ("default", "smollm2", "smollm2-135m-instruct")  # id and aliases of one model
        leases = await asyncio.wait_for(asyncio.gather(*(_later(router, n) for n in names)), 5)
        assert len({id(lease.worker) for lease in leases}) == 1
        assert router.state("smollm2-135m-instruct") == "loaded"
        await router.close()

    async def _later(router, name):
        lease = await router.acquire(name)
        lease.release()
        return lease

    asyncio.run(main())
    loads = [e for e in log if e[0] == "load"]
    assert len(loads) == 1 and loads[0][2].startswith("model:")


def test_lru_idle_model_is_evicted_to_fit_the_budget(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, budget=250 * MiB)
        for name in ("a", "b"):
            (await router.acquire(name)).release()
            clock.now += 10
        (await router.acquire("a")).release()  # a is now the most recently used
        clock.now += 10
        (await router.acquire("c")).release()  # needs room: b goes
        assert sorted(router.resident()) == ["a", "c"]
        assert router.used_memory() == 200 * MiB
        await router.close()

    asyncio.run(main())
    assert [e for e in log if e[0] == "unload"][0] == ("unload", "b")  # before close() unloads the rest


def test_shorter_keep_alive_is_evicted_before_older_but_longer(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, budget=250 * MiB)
        (await router.acquire("a", keep_alive="1h")).release()
        clock.now += 10
        (await router.acquire("b", keep_alive="30s")).release()
        (await router.acquire("c")).release()
        assert sorted(router.resident()) == ["a", "c"]
        await router.close()

    asyncio.run(main())


def test_a_busy_model_is_never_evicted_mid_request(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, budget=250 * MiB, max_loaded=2)
        busy = await router.acquire("a")
        (await router.acquire("b")).release()
        # c needs room: b is idle and goes, a keeps serving.
        (await router.acquire("c")).release()
        assert sorted(router.resident()) == ["a", "c"]
        # d needs room again; c is idle and goes.
        (await router.acquire("b")).release()
        assert "a" in router.resident()
        # Only a busy model left to evict: the load waits until its request ends.
        (await router.acquire("c")).release()  # evicts idle b first
        loading = asyncio.ensure_future(router.acquire("b"))  # must wait: a busy, c idle -> evicts c
        lease = await asyncio.wait_for(loading, 2)
        lease.release()
        assert "a" in router.resident() and busy.instance.active == 1
        await router.close()

    asyncio.run(main())


def test_marked_busy_model_unloads_when_its_last_request_ends(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, budget=150 * MiB)
        busy = await router.acquire("a")
        loading = asyncio.ensure_future(router.acquire("b"))
        await asyncio.sleep(0.05)
        assert not loading.done() and router.resident() == ["a"]  # a is serving: not cut off
        assert ("unload", "a") not in log
        busy.release()
        lease = await asyncio.wait_for(loading, 2)
        assert router.resident() == ["b"]
        lease.release()
        await router.close()

    asyncio.run(main())
    assert log.index(("unload", "a")) < [i for i, e in enumerate(log) if e[:2] == ("load", "b")][0]


def test_keep_alive_expiry_zero_and_forever(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, keep_alive=300)
        (await router.acquire("a")).release()
        (await router.acquire("b", keep_alive=0)).release()
        (await router.acquire("c", keep_alive=-1)).release()
        assert sorted(router.resident()) == ["a", "c"]  # keep_alive 0: unloaded after the request
        clock.now += 299
        assert router.reap() == []
        clock.now += 2
        assert router.reap() == ["a"]
        clock.now += 10 ** 6
        assert router.reap() == [] and router.resident() == ["c"]  # -1: forever
        await router.close()

    asyncio.run(main())


def test_queue_overflow_is_a_503_with_retry_after(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, max_queue=2)
        held = await router.acquire("a")
        waiters = [asyncio.ensure_future(router.acquire("a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await router.acquire("a")
        assert info.value.status_code == 503 and int(info.value.headers["Retry-After"]) >= 1
        held.release()
        for task in waiters:
            (await task).release()
        await router.close()

    asyncio.run(main())


def test_a_client_that_disconnects_while_queued_leaves_the_queue(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log)
        held = await router.acquire("a")
        gone = asyncio.Event()
        waiting = asyncio.ensure_future(router.acquire("a", disconnected=gone.wait))
        await asyncio.sleep(0.01)
        assert held.instance.waiting == 1
        gone.set()
        with pytest.raises(ClientGone):
            await waiting
        assert held.instance.waiting == 0
        held.release()
        (await asyncio.wait_for(router.acquire("a"), 1)).release()  # the slot was not lost
        await router.close()

    asyncio.run(main())


def test_failed_load_is_isolated_and_retried(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, fail={"a"})
        (await router.acquire("b")).release()
        with pytest.raises(ModelLoadError, match="corrupt weights"):
            await router.acquire("a")
        assert router.state("a") == "failed" and "corrupt" in router.load_error("a")
        assert router.resident() == ["b"]  # the other model keeps serving
        lease = await router.acquire("a")  # the next request retries the load
        assert router.state("a") == "loaded" and router.load_error("a") is None
        assert (await run(lease, "x", 2))[-1].usage.completion_tokens == 2
        with pytest.raises(ModelNotFound):
            await router.acquire("nope")
        await router.close()

    asyncio.run(main())


def test_a_model_bigger_than_the_budget_is_refused_without_evicting_anything(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, sizes={"a": 100, "big": 5000}, budget=1000 * MiB)
        (await router.acquire("a")).release()
        with pytest.raises(InsufficientMemory):
            await router.acquire("big")
        assert router.resident() == ["a"]
        await router.close()

    asyncio.run(main())


def test_parallel_slots_serve_requests_at_once_and_count_toward_memory(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, parallel={"a": 2})
        one, two = await router.acquire("a"), await asyncio.wait_for(router.acquire("a"), 1)
        assert one.worker is not two.worker
        assert router.used_memory() == 200 * MiB
        one.release(), two.release()
        await router.close()

    asyncio.run(main())


def test_closing_a_stream_cancels_generation_and_skips_queued_jobs(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log)
        lease = await router.acquire("a")
        params = GenerateParams(prompt="long", max_tokens=10_000)
        long_stream = lease.stream(lambda a, c: a.generate(params, c))
        queued = lease.stream(lambda a, c: a.generate(GenerateParams(prompt="gone", max_tokens=3), c))
        queued.close()
        assert (await anext(long_stream)).text == "long0 "
        long_stream.close()
        started = time.perf_counter()
        assert (await run(lease, "next", 2))[-1].finish_reason == "length"
        assert time.perf_counter() - started < 2.0
        await router.close()

    asyncio.run(main())
    assert ("start", "gone") not in log
    assert ("end", "long") not in log  # cut off mid-way, its generator closed by the worker


# --- the Lab's copies: the same pool, the same budget ------------------------------------------
def lab_copy(router, name):
    """A Lab copy of model `name` checked out of the pool (what a Lab job holds while it runs)."""
    return router.checkout(router.registry.get(name), purpose=LAB)


def test_a_lab_copy_evicts_idle_models_and_counts_in_the_budget(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, budget=250 * MiB)
        for name in ("a", "b"):
            (await router.acquire(name)).release()
            clock.now += 10
        copy = await lab_copy(router, "c")  # 300 > 250: a (least recent) goes
        assert router.resident() == ["b"] and router.used_memory() == 200 * MiB
        assert [i.memory for i in router.instances(LAB)] == [100 * MiB]
        copy.release()
        copy.release()  # twice is harmless
        assert router.used_memory() == 200 * MiB  # an idle copy stays loaded for the next job
        assert (await lab_copy(router, "c")).instance is copy.instance  # ... and is reused
        await router.close()

    asyncio.run(main())
    assert ("unload", "a") in log and ("unload", "b") in log
    assert len([e for e in log if e[0] == "load" and e[1] == "c"]) == 1


def test_a_load_frees_idle_lab_copies_before_evicting_models(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, budget=250 * MiB)
        (await router.acquire("a")).release()
        (await lab_copy(router, "c")).release()  # idle now
        (await router.acquire("b")).release()  # 300 > 250: the idle copy goes, a stays
        assert sorted(router.resident()) == ["a", "b"] and router.instances(LAB) == []
        assert [e for e in log if e[0] == "unload"] == [("unload", "c")]
        await router.close()

    asyncio.run(main())


def test_busy_lab_copies_that_leave_no_room_are_a_507_and_nothing_is_lost(tmp_path):
    log = []

    async def main():
        router, _ = make_router(tmp_path, log, budget=250 * MiB, sizes={"a": 100, "b": 100, "c": 200, "big": 300})
        copy = await lab_copy(router, "c")  # a job holds it
        with pytest.raises(InsufficientMemory, match="running Lab jobs hold 200 MiB"):
            await router.acquire("a")
        with pytest.raises(InsufficientMemory, match="more than the whole budget"):
            await lab_copy(router, "big")
        assert router.used_memory() == 200 * MiB
        copy.release()
        (await router.acquire("a")).release()  # fits once the job is done (its idle copy gives way)
        assert router.resident() == ["a"]
        await router.close()

    asyncio.run(main())


def test_lab_copies_beyond_max_copies_are_dropped_least_recently_used_first(tmp_path):
    log = []

    async def main():
        router, clock = make_router(tmp_path, log, max_copies=2)
        for name in ("a", "b"):
            (await lab_copy(router, name)).release()
            clock.now += 10
        (await lab_copy(router, "c")).release()  # a third copy: the least recently used (a) goes
        assert sorted(i.model_id for i in router.instances(LAB)) == ["b", "c"]
        busy = await lab_copy(router, "b")
        second = await lab_copy(router, "b")  # b's copy is busy: a second copy of b loads, c gives way
        assert second.instance is not busy.instance
        assert sorted(i.model_id for i in router.instances(LAB)) == ["b", "b"]
        await router.close()

    asyncio.run(main())
