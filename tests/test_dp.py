"""Data parallelism (`--dp R`): one scheduler planning R replicas' pools.

The engine checks run tests/dp_check.py in a subprocess on 4 simulated CPU devices
(`--dp 2 --tp 2`, the tiny random Llama of tests/lora_helpers.py). Its loops are bounded in
engine steps; service is counted in tokens, never in time.

Fairness. Two tenants, both backlogged: A sends 2 requests and B 8 (4x A's load) in every
burst of 10, in the order A B A B B B B B B B (tests/dp_check.py BURST); every request is 8
prompt + 8 output tokens. Service W = 1 * prompt tokens + 2 * output tokens (VTC's weights).
- Under `--dp 2` the one VTC policy sees both tenants backlogged and admits by their global
  counters: equal service (observed exactly 1:1; asserted within 15%).
- Two independent `--dp 1` servers behind round-robin dispatch (request k to server k % 2):
  A's requests sit at even slots, so all of them reach server 0, while B's reach both.
  Server 0's VTC splits server 0 equally between A and B (both backlogged there); server 1
  serves only B. B gets 1/2 + 1 servers, A 1/2: 3x A's service (observed exactly 3.0).
  That is the most per-replica fairness can give away with 2 replicas while A stays
  backlogged somewhere (A keeps half of every server where it waits; R replicas: 2R - 1),
  and it reaches the issue's ~4x (B's whole 4:1 demand ratio) only with 3 or more replicas,
  so the check asserts B/A >= 2.5 against <= 1.15 under the global counters.
With the same tenants spread evenly by round-robin, per-server VTC would be fair too: the
loss comes from dispatch that correlates with the tenant (sticky sessions, a client's
request cadence), which one global scheduler makes harmless.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scheduler import (FinishReason, ReplicaScheduler, Scheduler, SchedulerConfig, Sequence,
                       SequenceStatus)
from scheduler.factory import make_policy

HERE = os.path.dirname(__file__)


# -- the scheduler alone (no JAX, no devices) -----------------------------------------------------
def _seq(i: int, client: str = "c", adapter: str | None = None, n: int = 8, out: int = 4):
    return Sequence(seq_id=i, prompt_token_ids=[1 + i % 50] * n, max_tokens=out,
                    client_id=client, adapter=adapter)


def _replicas(policy="vtc", **kw) -> ReplicaScheduler:
    cfg = SchedulerConfig(num_pages=kw.pop("num_pages", 17), page_size=4, max_num_seqs=2,
                          max_prefill_tokens=64, mixed_steps=True)
    return ReplicaScheduler(cfg, make_policy(policy), num_replicas=2, **kw)


def _run(sched, plan):
    """Record a token for every sampled entry; finish what reached max_tokens."""
    produced = sched.update(plan, [7] * len(plan.seqs))
    for s in produced:
        if s.num_output_tokens >= s.max_tokens:
            sched.finish(s, FinishReason.LENGTH)


def test_global_vtc_order_decides_who_and_balances_where():
    """Both replicas fill from one queue in VTC order: B's burst arrived first, yet A's single
    request is admitted in the first step (its counter is the least), and the 4 rows are
    split 2 + 2 over the replicas."""
    sched = _replicas()
    for i in range(6):
        sched.add(_seq(i, "B"))
    sched.add(_seq(6, "A"))
    plan = sched.schedule()
    admitted = [(s.client_id, s.replica) for s in plan.seqs]
    assert ("A", 0) in admitted or ("A", 1) in admitted
    assert sorted(r for _, r in admitted) == [0, 0, 1, 1]
    assert len(plan.plans) == 2 and plan.offsets == [0, 2, 4]
    # both replicas charge the one policy
    _run(sched, plan)
    counters = {c: st.counter for c, st in sched.policy.clients.items()}
    assert counters["B"] > 0 and counters["A"] > 0


def test_pages_return_to_their_replica():
    sched = _replicas()
    for i in range(5):
        sched.add(_seq(i, "ab"[i % 2]))
    for _ in range(40):
        if not sched.has_work:
            break
        _run(sched, sched.schedule())
    assert not sched.has_work
    assert [r.allocator.num_free for r in sched.replicas] == [16, 16]
    assert sched.allocator.num_free == 32


def test_adapter_locality_without_breaking_order():
    """A request goes where its adapter is resident when both replicas have room; the VTC
    order still decides who is admitted (locality never lets a later request jump ahead)."""
    sched = _replicas(adapter_pages=lambda name: 2)
    first = _seq(0, "a", adapter="x")
    sched.add(first)
    _run(sched, sched.schedule())                      # x loaded where `first` runs
    home = first.replica
    for _ in range(10):
        _run(sched, sched.schedule())
    assert first.status is SequenceStatus.FINISHED
    assert sched.replicas[home].adapters.is_resident("x")
    assert not sched.replicas[1 - home].adapters.is_resident("x")
    # a base request takes the replica with more free pages (the other, x holds pages here)
    base = _seq(1, "b")
    sched.add(base)
    sched.schedule()
    assert base.replica == 1 - home
    # equal running counts, fewer free pages at home: x's next request still goes home
    again = _seq(2, "a", adapter="x")
    sched.add(again)
    sched.schedule()
    assert again.replica == home
    assert not sched.replicas[1 - home].adapters.is_resident("x")


def test_a_sample_joins_its_siblings_replica():
    """n > 1: a sample shares its sibling's prompt pages, so it is placed on its replica."""
    sched = _replicas(num_pages=33)
    parent = _seq(0, "c", n=12)
    sched.add(parent)
    sched.add(_seq(1, "c"))            # fills the other replica's emptier slot first
    sched.schedule()
    child = _seq(2, "c", n=12)
    child.prompt_token_ids = list(parent.prompt_token_ids)
    child.fork_parent = parent
    sched.add(child)
    sched.schedule()
    assert child.replica == parent.replica
    assert child.block_table[:2] == parent.block_table[:2]   # its full prompt pages, shared


def test_dp_one_keeps_the_single_scheduler():
    with pytest.raises(ValueError, match="2 or more"):
        ReplicaScheduler(SchedulerConfig(num_pages=8), num_replicas=1)
    assert Scheduler(SchedulerConfig(num_pages=8)).allocator_of(_seq(0)) is not None


def test_bad_combinations_are_refused():
    from jaxserve.cli import main
    from jaxserve.engine import EngineConfig
    from jaxserve.replicas import replica_devices
    with pytest.raises(ValueError, match="dp must be positive"):
        EngineConfig(dp=0)
    with pytest.raises(ValueError, match=r"--dp 2 --tp 2 needs dp \* tp = 4 devices, but 1"):
        replica_devices(2, 2)
    assert main(["generate", "--dp", "3", "--prompt", "hi", "--max-tokens", "1"]) == 2


def test_replicas_across_processes_take_whole_processes_or_parts_of_one():
    """Across processes a replica is part of one process's devices or all devices of each
    process it spans (3 processes of 2 devices here); anything else is refused naming it."""
    from types import SimpleNamespace

    from jaxserve.replicas import processes, replica_devices
    devs = [SimpleNamespace(id=i, process_index=i // 2, platform="cpu") for i in range(6)]
    assert [processes(g) for g in replica_devices(6, 1, devs)] == [[0], [0], [1], [1], [2], [2]]
    assert [processes(g) for g in replica_devices(3, 2, devs)] == [[0], [1], [2]]
    assert [processes(g) for g in replica_devices(1, 6, devs)] == [[0, 1, 2]]
    devs8 = [SimpleNamespace(id=i, process_index=i // 2, platform="cpu") for i in range(8)]
    assert [processes(g) for g in replica_devices(2, 4, devs8)] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"replica 0 would take part of the devices of "
                                         r"processes \[0, 1\]"):
        replica_devices(2, 3, devs)


# -- the engine on 4 simulated devices -------------------------------------------------------------
@pytest.fixture(scope="module")
def dp(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dp")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dp_check.py"), str(root)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    return res


@pytest.mark.slow   # a subprocess compiling 3 engines (~60 s on 2 cores)
def test_dp2_global_vtc_is_fair_where_round_robin_is_not(dp):
    glob, rr = dp["global"], dp["round_robin"]
    assert min(glob["service"].values()) > 0
    assert abs(glob["ratio_b_over_a"] - 1.0) <= 0.15, glob
    assert rr["ratio_b_over_a"] >= 2.5, rr
    # the same work gets done: neither setup idles a replica
    total = sum(glob["service"].values())
    assert abs(total - sum(rr["service"].values())) <= 0.15 * total


@pytest.mark.slow   # a subprocess compiling 3 engines (~60 s on 2 cores)
def test_dp2_greedy_outputs_equal_dp1(dp):
    g = dp["greedy"]
    assert g["dp2"] == g["dp1"]


@pytest.mark.slow   # a subprocess compiling 3 engines (~60 s on 2 cores)
def test_dp2_pages_freed_after_requests_finish(dp):
    g = dp["greedy"]
    assert [p["used"] for p in g["dp2_pages"]] == [0, 0]
    assert [p["used"] for p in dp["global"]["pages_after"]] == [0, 0]   # after aborts too
    after = dp["locality"]["pages_after"]
    assert [p["used"] - p["adapter_pages"] for p in after] == [0, 0]   # only a1's pages stay


@pytest.mark.slow   # a subprocess compiling 3 engines (~60 s on 2 cores)
def test_dp2_adapter_locality_and_outputs(dp):
    loc = dp["locality"]
    assert loc["first"] == {"lora-1": 0}
    # base-1 took the replica with more free pages, base-2 the one with fewer running; lora-2
    # went where a1 is resident, against the free-page tie-break
    assert loc["second"] == {"base-1": 1, "base-2": 0, "lora-2": 0}
    assert [p["resident"] for p in loc["pages_mid"]] == [["a1"], []]
    outs = loc["outputs"]
    assert outs["lora-1"] == outs["lora-2"] == loc["lora_ref"]
    assert outs["base-1"] == outs["base-2"] == loc["base_ref"]
    assert loc["lora_ref"] != loc["base_ref"][:len(loc["lora_ref"])]


@pytest.mark.slow   # a subprocess compiling 3 engines (~60 s on 2 cores)
def test_dp2_engine_stats_sum_the_replicas(dp):
    st = dp["stats"]
    assert st["num_total_pages"] == 2 * 11          # 12 pages each, page 0 reserved
    assert st["num_free_pages"] == st["num_total_pages"] - dp["locality"]["pages_after"][0][
        "adapter_pages"]
    assert st["num_running"] == st["num_waiting"] == 0
    assert st["num_programs_compiled"] > 0
    assert dp["runner"]["num_pages"] == 12 and dp["runner"]["dropped"] == 0

