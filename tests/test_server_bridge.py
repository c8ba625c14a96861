"""AsyncEngine (the thread bridge) over the real engine on a fake runner: delivery, abort,
bounds, shutdown. `runner.gate` bounds the steps the engine may run, so no test depends on
how fast a thread runs."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fake_runner import Spy, expected_text, fake_engine
from jaxserve.admission import OVERLOAD, UNKNOWN, AdmissionError
from jaxserve.async_engine import (MAX_STEP_FAILURES, AsyncEngine, AsyncEngineConfig, EngineError,
                                  EngineStopped)
from jaxserve.sampling_params import SamplingParams


def run(coro):
    return asyncio.run(coro)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]   # the CharTokenizer


def test_tokens_arrive_in_order_and_match_the_engine():
    async def main():
        eng = fake_engine(max_num_seqs=2)
        ae = AsyncEngine(eng)
        ae.start()
        outs = [o async for o in ae.generate("r1", ids("hello"), greedy(7))]
        await ae.shutdown()
        return eng, outs
    eng, outs = run(main())
    assert "".join(o.new_text for o in outs) == expected_text("hello", 7)
    assert [len(o.token_ids) for o in outs] == list(range(1, 8))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert eng.stats()["num_free_pages"] == eng.stats()["num_total_pages"]


def test_many_concurrent_requests_all_complete_and_pages_return():
    async def main():
        eng = fake_engine(max_num_seqs=3, num_pages=64)
        ae = AsyncEngine(eng)
        ae.start()

        async def one(i):
            return [o async for o in ae.generate(f"r{i}", ids(f"p{i}"), greedy(1 + i % 5))]
        results = await asyncio.gather(*(one(i) for i in range(20)))
        stats = await ae.stats()
        await ae.shutdown()
        return results, stats
    results, stats = run(main())
    for i, outs in enumerate(results):
        assert outs[-1].text == expected_text(f"p{i}", 1 + i % 5)
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["num_running"] == stats["num_waiting"] == 0


def test_cancelling_a_consumer_aborts_the_request_and_frees_pages():
    async def main():
        eng = fake_engine(max_num_seqs=2)
        spy = Spy(eng, "abort")
        eng.runner.gate.limit(5)    # at most 5 steps until the abort is sent
        ae = AsyncEngine(eng)
        ae.start()
        got = []

        async def consume():
            async for o in ae.generate("long", ids("abc"), greedy(200)):
                got.append(o)
        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        eng.runner.gate.open()
        stats = await ae.stats()  # commands run in order: the abort ran before this call
        await ae.shutdown()
        return spy, stats, got
    spy, stats, got = run(main())
    assert 3 <= len(got) <= 5
    assert spy.calls["abort"] == 1
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["num_running"] == 0


def test_leaving_a_stream_early_aborts_it():
    async def main():
        eng = fake_engine()
        spy = Spy(eng, "abort")
        eng.runner.gate.limit(3)
        ae = AsyncEngine(eng)
        ae.start()
        async with await ae.submit("x", ids("abc"), greedy(100)) as stream:
            async for o in stream:
                if len(o.token_ids) == 2:
                    break
        eng.runner.gate.open()
        stats = await ae.stats()
        await ae.shutdown()
        return spy, stats
    spy, stats = run(main())
    assert spy.calls["abort"] == 1 and stats["num_free_pages"] == stats["num_total_pages"]


def test_admission_errors_reach_the_caller():
    async def main():
        ae = AsyncEngine(fake_engine())
        ae.start()
        with pytest.raises(AdmissionError, match="unknown adapter") as unknown:
            await ae.submit("a", ids("hi"), greedy(2), adapter="nope")
        with pytest.raises(AdmissionError, match="context length") as too_long:
            await ae.submit("b", ids("hi"), greedy(10_000))
        with pytest.raises(AdmissionError, match="empty"):
            await ae.submit("c", [], greedy(2))
        ok = [o async for o in ae.generate("d", ids("hi"), greedy(2))]
        await ae.shutdown()
        return ok, ae.num_waiting, unknown.value, too_long.value
    ok, waiting, unknown, too_long = run(main())
    assert ok[-1].text == expected_text("hi", 2)
    assert waiting == 0
    assert unknown.kind == UNKNOWN and too_long.code == "context_length_exceeded"


def test_queue_full_beyond_max_waiting():
    async def main():
        eng = fake_engine(max_num_seqs=1)
        eng.runner.gate.limit(0)    # nobody gets a first token: all admitted ones are waiting
        ae = AsyncEngine(eng, AsyncEngineConfig(max_waiting=3))
        ae.start()
        submits = [asyncio.create_task(ae.submit(f"r{i}", ids("abc"), greedy(50)))
                   for i in range(3)]
        await asyncio.sleep(0)      # each task counts itself as waiting before it awaits
        with pytest.raises(AdmissionError) as full:
            await ae.submit("r9", ids("abc"), greedy(50))
        eng.runner.gate.open()
        for stream in await asyncio.gather(*submits):
            stream.close()
        # Aborted requests no longer count: admission works again.
        outs = [o async for o in ae.generate("r4", ids("abc"), greedy(1))]
        stats = await ae.stats()
        await ae.shutdown()
        return full.value, outs, stats
    full, outs, stats = run(main())
    assert full.kind == OVERLOAD and full.code == "queue_full"
    assert outs[-1].finished
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_idle_engine_thread_sleeps_instead_of_spinning():
    async def main():
        eng = fake_engine()
        spy = Spy(eng, "has_unfinished")
        ae = AsyncEngine(eng)
        ae.start()
        [o async for o in ae.generate("a", ids("hi"), greedy(3))]
        steps, checks = ae.num_steps, spy.calls["has_unfinished"]
        await asyncio.sleep(0.3)
        idle_checks = spy.calls["has_unfinished"] - checks
        await ae.shutdown()
        return steps, ae.num_steps, idle_checks
    steps_before, steps_after, idle_checks = run(main())
    assert steps_before == steps_after == 3   # no step ran while idle
    assert idle_checks <= 2                   # and the thread did not loop: it blocked


def test_shutdown_aborts_in_flight_after_grace_and_refuses_new():
    async def main():
        eng = fake_engine()
        eng.runner.gate.limit(3)    # the request cannot finish
        ae = AsyncEngine(eng)
        ae.start()
        stream = await ae.submit("slow", ids("abc"), greedy(200))
        got = []

        async def consume():
            try:
                async for o in stream:
                    got.append(o)
            except EngineStopped:
                got.append("stopped")
        task = asyncio.create_task(consume())
        shutdown = asyncio.create_task(ae.shutdown(grace_s=0.0))
        while ae.num_in_flight:     # shutdown fails and releases the stream after the grace
            await asyncio.sleep(0.005)
        eng.runner.gate.open()      # so the engine thread reaches the abort and the stop
        await shutdown
        await task
        with pytest.raises(EngineStopped):
            await ae.submit("late", ids("abc"), greedy(2))
        return eng, got, ae
    eng, got, ae = run(main())
    assert got[-1] == "stopped"
    stats = eng.stats()
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0
    assert not ae.is_running


def test_shutdown_lets_short_requests_finish():
    async def main():
        ae = AsyncEngine(fake_engine())
        ae.start()
        task = asyncio.create_task(_collect(ae.generate("a", ids("abc"), greedy(10))))
        while ae.num_in_flight == 0:
            await asyncio.sleep(0)
        await ae.shutdown(grace_s=600.0)   # returns as soon as the request is done
        return await task
    outs = run(main())
    assert outs[-1].finished and outs[-1].text == expected_text("abc", 10)


async def _collect(agen):
    return [o async for o in agen]


def test_engine_is_only_called_from_its_thread():
    async def main():
        eng = fake_engine()
        spy = Spy(eng, "add_request", "abort", "step", "has_unfinished", "stats")
        ae = AsyncEngine(eng)
        ae.start()
        await asyncio.gather(*(_collect(ae.generate(f"r{i}", ids("x"), greedy(3))) for i in range(5)))
        await ae.stats()
        await ae.shutdown()
        return eng, spy
    eng, spy = run(main())
    assert spy.calls["step"] > 0 and spy.calls["stats"] == 1
    assert len(spy.threads | eng.runner.threads) == 1
    assert threading.get_ident() not in spy.threads


def test_a_failed_step_fails_in_flight_requests_frees_pages_and_keeps_serving():
    async def main():
        eng = fake_engine()
        runner = eng.runner
        runner.gate.limit(1)
        ae = AsyncEngine(eng)
        ae.start()
        stream = await ae.submit("a", ids("abc"), greedy(50))
        await stream.__anext__()
        runner.num_failing_steps = 1   # the next step fails
        runner.gate.open()
        with pytest.raises(EngineError, match="injected"):
            async for _ in stream:
                pass
        stats = await ae.stats()
        after = await _collect(ae.generate("b", ids("abc"), greedy(3)))
        runner.num_failing_steps = MAX_STEP_FAILURES
        failures = 0
        for i in range(MAX_STEP_FAILURES):
            try:
                await _collect(ae.generate(f"c{i}", ids("abc"), greedy(3)))
            except (EngineError, EngineStopped):
                failures += 1
        running = ae.is_running
        await ae.shutdown()
        return stats, after, failures, running
    stats, after, failures, running = run(main())
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0
    assert after[-1].text == expected_text("abc", 3)
    assert failures == MAX_STEP_FAILURES and not running
