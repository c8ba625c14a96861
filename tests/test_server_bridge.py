"""AsyncEngine (the thread bridge) with the fake engine: delivery, abort, bounds, shutdown."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fake_engine import FakeEngine, expected_text
from jaxserve.async_engine import (MAX_STEP_FAILURES, AsyncEngine, AsyncEngineConfig, EngineError,
                                  EngineStopped, QueueFull)
from jaxserve.sampling_params import SamplingParams


def run(coro):
    return asyncio.run(coro)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_tokens_arrive_in_order_and_match_the_engine():
    async def main():
        eng = FakeEngine(max_num_seqs=2)
        ae = AsyncEngine(eng)
        ae.start()
        outs = [o async for o in ae.generate("r1", "hello", greedy(7))]
        await ae.shutdown()
        return eng, outs
    eng, outs = run(main())
    assert "".join(o.new_text for o in outs) == expected_text("hello", 7)
    assert [len(o.token_ids) for o in outs] == list(range(1, 8))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert eng.free_pages == eng.num_pages


def test_many_concurrent_requests_all_complete_and_pages_return():
    async def main():
        eng = FakeEngine(max_num_seqs=3, num_pages=64)
        ae = AsyncEngine(eng)
        ae.start()

        async def one(i):
            return [o async for o in ae.generate(f"r{i}", f"p{i}", greedy(1 + i % 5))]
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
        eng = FakeEngine(max_num_seqs=2, step_delay_s=0.005)
        ae = AsyncEngine(eng)
        ae.start()
        got = []

        async def consume():
            async for o in ae.generate("long", "abc", greedy(200)):
                got.append(o)
        task = asyncio.create_task(consume())
        while len(got) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = await ae.stats()  # commands run in order: the abort ran before this call
        await ae.shutdown()
        return eng, stats, got
    eng, stats, got = run(main())
    assert 3 <= len(got) < 200
    assert eng.num_aborted == 1
    assert stats["num_free_pages"] == stats["num_total_pages"]
    assert stats["num_running"] == 0


def test_leaving_a_stream_early_aborts_it():
    async def main():
        eng = FakeEngine(step_delay_s=0.002)
        ae = AsyncEngine(eng)
        ae.start()
        async with await ae.submit("x", "abc", greedy(100)) as stream:
            async for o in stream:
                if len(o.token_ids) == 2:
                    break
        stats = await ae.stats()
        await ae.shutdown()
        return eng, stats
    eng, stats = run(main())
    assert eng.num_aborted == 1 and stats["num_free_pages"] == stats["num_total_pages"]


def test_admission_errors_reach_the_caller():
    async def main():
        ae = AsyncEngine(FakeEngine())
        ae.start()
        with pytest.raises(ValueError, match="unknown adapter"):
            await ae.submit("a", "hi", greedy(2), adapter="nope")
        with pytest.raises(ValueError, match="context"):
            await ae.submit("b", "hi", greedy(10_000))
        ok = [o async for o in ae.generate("c", "hi", greedy(2))]
        await ae.shutdown()
        return ok, ae.num_waiting
    ok, waiting = run(main())
    assert ok[-1].text == expected_text("hi", 2)
    assert waiting == 0


def test_queue_full_beyond_max_waiting():
    async def main():
        # One running slot and a slow step: the others wait without a first token.
        eng = FakeEngine(max_num_seqs=1, step_delay_s=0.02)
        ae = AsyncEngine(eng, AsyncEngineConfig(max_waiting=3))
        ae.start()
        first = await ae.submit("r0", "abc", greedy(50))
        await first.__anext__()       # r0 runs: it no longer counts as waiting
        streams = [first] + [await ae.submit(f"r{i}", "abc", greedy(50)) for i in range(1, 4)]
        with pytest.raises(QueueFull):
            await ae.submit("r9", "abc", greedy(50))
        for s in streams:
            s.close()
        # Aborted requests no longer count: admission works again.
        outs = [o async for o in ae.generate("r4", "abc", greedy(1))]
        stats = await ae.stats()
        await ae.shutdown()
        return outs, stats
    outs, stats = run(main())
    assert outs[-1].finished
    assert stats["num_free_pages"] == stats["num_total_pages"]


def test_idle_engine_thread_sleeps_instead_of_spinning():
    async def main():
        eng = FakeEngine()
        ae = AsyncEngine(eng)
        ae.start()
        [o async for o in ae.generate("a", "hi", greedy(3))]
        steps, checks = ae.num_steps, eng.num_has_unfinished_calls
        await asyncio.sleep(0.3)
        idle_checks = eng.num_has_unfinished_calls - checks
        await ae.shutdown()
        return steps, ae.num_steps, idle_checks
    steps_before, steps_after, idle_checks = run(main())
    assert steps_before == steps_after == 3   # no step ran while idle
    assert idle_checks <= 2                   # and the thread did not loop: it blocked


def test_shutdown_aborts_in_flight_after_grace_and_refuses_new():
    async def main():
        eng = FakeEngine(step_delay_s=0.01)
        ae = AsyncEngine(eng)
        ae.start()
        stream = await ae.submit("slow", "abc", greedy(200))
        got = []

        async def consume():
            try:
                async for o in stream:
                    got.append(o)
            except EngineStopped:
                got.append("stopped")
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await ae.shutdown(grace_s=0.05)
        await task
        with pytest.raises(EngineStopped):
            await ae.submit("late", "abc", greedy(2))
        return eng, got, ae
    eng, got, ae = run(main())
    assert got[-1] == "stopped"
    assert eng.free_pages == eng.num_pages and not eng.running
    assert not ae.is_running


def test_shutdown_lets_short_requests_finish():
    async def main():
        eng = FakeEngine(step_delay_s=0.005)
        ae = AsyncEngine(eng)
        ae.start()
        task = asyncio.create_task(asyncio.wait_for(
            _collect(ae.generate("a", "abc", greedy(10))), 10))
        await asyncio.sleep(0.01)
        await ae.shutdown(grace_s=5.0)
        return await task
    outs = run(main())
    assert outs[-1].finished and outs[-1].text == expected_text("abc", 10)


async def _collect(agen):
    return [o async for o in agen]


def test_engine_is_only_called_from_its_thread():
    async def main():
        eng = FakeEngine()
        ae = AsyncEngine(eng)
        ae.start()
        await asyncio.gather(*(_collect(ae.generate(f"r{i}", "x", greedy(3))) for i in range(5)))
        await ae.stats()
        await ae.shutdown()
        return eng
    eng = run(main())
    assert eng.owner_thread is not None and eng.owner_thread != threading.get_ident()


def test_a_failed_step_fails_in_flight_requests_frees_pages_and_keeps_serving():
    async def main():
        eng = FakeEngine(step_delay_s=0.002)
        ae = AsyncEngine(eng)
        ae.start()
        stream = await ae.submit("a", "abc", greedy(50))
        await stream.__anext__()
        eng.num_failing_steps = 1
        with pytest.raises(EngineError, match="injected"):
            async for _ in stream:
                pass
        stats = await ae.stats()
        after = await _collect(ae.generate("b", "abc", greedy(3)))
        eng.num_failing_steps = MAX_STEP_FAILURES
        failures = 0
        for i in range(MAX_STEP_FAILURES):
            try:
                await _collect(ae.generate(f"c{i}", "abc", greedy(3)))
            except (EngineError, EngineStopped):
                failures += 1
        running = ae.is_running
        await ae.shutdown()
        return stats, after, failures, running
    stats, after, failures, running = run(main())
    assert stats["num_free_pages"] == stats["num_total_pages"] and stats["num_running"] == 0
    assert after[-1].text == expected_text("abc", 3)
    assert failures == MAX_STEP_FAILURES and not running
