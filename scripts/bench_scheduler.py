"""Scheduler overhead: one admission round with 1,000 clients and 10,000 waiting requests.

Fills a VTC policy (and a Scheduler around it) with 10,000 waiting requests from 1,000
clients with spread-out counters, then times (a) one `peek` + `pop` (one admission) and
(b) one full admission round of `Scheduler.schedule()` that admits until the batch is full.
Prints the times; asserts nothing.  Usage: python scripts/bench_scheduler.py
"""
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from scheduler import Scheduler, SchedulerConfig, Sequence  # noqa: E402
from scheduler.factory import make_policy  # noqa: E402

NUM_CLIENTS, NUM_WAITING, NUM_REPEATS = 1000, 10_000, 20


def build(rng):
    pol = make_policy("vtc")
    cfg = SchedulerConfig(num_pages=10_000 // 16 + 1, page_size=16, max_num_seqs=64,
                          max_prefill_tokens=4096, max_model_len=10_000)
    sched = Scheduler(cfg, pol)
    for i in range(NUM_WAITING):
        s = Sequence(seq_id=i, prompt_token_ids=[0] * rng.randint(16, 256), max_tokens=256,
                     client_id=f"c{rng.randrange(NUM_CLIENTS)}")
        sched.add(s, 0.0)
    for st in pol.clients.values():  # spread the counters, as after a long run
        st.counter = rng.uniform(0, 1e5)
    pol._heap.rebuild(pol.clients)
    return sched, pol


def main():
    rng = random.Random(0)
    one, rounds, admitted = [], [], []
    for _ in range(NUM_REPEATS):
        sched, pol = build(rng)
        t0 = time.perf_counter()
        s = pol.peek()
        pol.pop(s, 0.0)
        one.append(time.perf_counter() - t0)
        pol.requeue(s)
        t0 = time.perf_counter()
        plan = sched.schedule(0.0)
        rounds.append(time.perf_counter() - t0)
        admitted.append(len(plan.seqs))
    print(f"{NUM_CLIENTS} clients, {NUM_WAITING} waiting requests, {NUM_REPEATS} repeats")
    print(f"one admission (peek + pop):        median {statistics.median(one) * 1e6:7.1f} us, "
          f"max {max(one) * 1e6:7.1f} us")
    print(f"one admission round (schedule()):  median {statistics.median(rounds) * 1e6:7.1f} us, "
          f"max {max(rounds) * 1e6:7.1f} us, admitting {statistics.median(admitted):.0f} requests")


if __name__ == "__main__":
    main()
