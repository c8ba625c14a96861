"""VTC, LCF, RPM and make_policy: hand-computed unit tests of each rule in vtc.md."""
import pytest

from scheduler import FinishReason, RequestRejected, Scheduler, SchedulerConfig, Sequence
from scheduler.cost import LinearCost, QuadraticCost
from scheduler.factory import POLICY_NAMES, make_policy
from scheduler.predict import TRUE_OUTPUT_LEN, MovingAveragePredictor
from scheduler.vtc import VTCPolicy

_ids = iter(range(10**9))


def seq(client, n_p=10, max_tokens=5, **extra):
    s = Sequence(seq_id=next(_ids), prompt_token_ids=[1] * n_p, max_tokens=max_tokens, client_id=client)
    s.extra.update(extra)
    return s


def admit(pol, now=0.0):
    s = pol.peek()
    pol.pop(s, now)
    return s


def produce(pol, seqs, n=1):
    for _ in range(n):
        for s in seqs:
            s.output_token_ids.append(7)
        pol.on_tokens(list(seqs))


def test_prefill_charged_at_admission_and_one_w_q_per_token_including_the_first():
    pol = VTCPolicy(cost=LinearCost(1.0, 2.0))
    a = seq("a", n_p=10)
    pol.add(a, 0.0)
    assert pol.clients["a"].counter == 0.0
    admit(pol)
    assert pol.clients["a"].counter == 10.0
    produce(pol, [a], 3)  # the first of these is the token prefill produced
    assert pol.clients["a"].counter == 16.0
    pol.on_finish(a)
    assert pol.clients["a"].counter == 16.0  # nothing extra when a request finishes


def test_least_counter_first_with_deterministic_ties():
    pol = VTCPolicy()
    for c in ("b", "a", "c"):
        pol.add(seq(c), 0.0)
    # Equal counters: first seen wins, every time.
    assert [admit(pol).client_id for _ in range(3)] == ["b", "a", "c"]


def test_lift_to_least_backlogged_counter():
    pol = VTCPolicy()
    a1, a2, b1 = seq("a", n_p=100), seq("a", n_p=100), seq("b", n_p=40)
    pol.add(a1, 0.0)
    pol.add(a2, 0.0)
    pol.add(b1, 0.0)
    admit(pol)          # a1: a = 100
    admit(pol)          # b1: b = 40, b's queue empty
    # a is backlogged at 100; b returns with a lower counter and is lifted to 100.
    pol.add(seq("b"), 1.0)
    assert pol.clients["b"].counter == 100.0
    assert pol.clients["b"].lifted == 60.0


def test_lift_to_last_left_when_nobody_is_backlogged():
    pol = VTCPolicy()
    a, b = seq("a", n_p=100), seq("b", n_p=30)
    pol.add(a, 0.0)
    pol.add(b, 0.0)
    admit(pol)          # b's counter 0 < ... order: a first (tie, first seen)
    admit(pol)          # b admitted last -> last_left = b, counters a=100, b=30
    pol.add(seq("c"), 1.0)
    assert pol.clients["c"].counter == 30.0  # lifted to b, the client that left last
    # A lift never lowers a counter.
    pol.add(seq("a"), 1.0)
    assert pol.clients["a"].counter == 100.0


def test_lcf_does_not_lift_so_idle_clients_bank_credit():
    pol = make_policy("lcf")
    a1, a2 = seq("a", n_p=100), seq("a", n_p=100)
    pol.add(a1, 0.0)
    pol.add(a2, 0.0)
    admit(pol)
    pol.add(seq("b"), 1.0)
    assert pol.clients["b"].counter == 0.0
    assert admit(pol).client_id == "b"


def test_weighted_increments_are_divided_by_weight():
    pol = make_policy("wvtc", fair_weights={"a": 2.0})
    a, b = seq("a", n_p=10), seq("b", n_p=10)
    pol.add(a, 0.0)
    pol.add(b, 0.0)
    admit(pol), admit(pol)
    produce(pol, [a, b], 2)
    assert pol.clients["a"].counter == pytest.approx((10 + 4) / 2)
    assert pol.clients["b"].counter == pytest.approx(14)
    assert pol.stats()["clients"]["a"]["service"] == pytest.approx(14)


def test_preempted_request_requeued_in_front_without_lift_or_second_prefill_charge():
    cfg = SchedulerConfig(num_pages=9, page_size=4, max_num_seqs=4, max_prefill_tokens=64, max_model_len=64)
    pol = VTCPolicy()
    sched = Scheduler(cfg, pol)
    seqs = [Sequence(seq_id=i, prompt_token_ids=[1] * 6, max_tokens=20, client_id=c)
            for i, c in enumerate("aab")]
    for s in seqs:
        sched.add(s)
    lifts = []
    while sched.has_work:
        plan = sched.schedule()
        if plan.preempted:
            lifts.append({c: st.lifted for c, st in pol.clients.items()})
        for s in sched.update(plan, [7 if plan.samples(i) else None for i in range(len(plan.seqs))]):
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
    assert sum(s.num_preemptions for s in seqs) > 0
    # Each prompt charged once, each output token once: 3 * (6 + 2 * 20), whatever was recomputed.
    assert sum(st.charged for st in pol.clients.values()) == 3 * (6 + 40)
    assert all(st.lifted == 0 for st in pol.clients.values())


def test_requeue_goes_to_front_of_its_client_queue():
    pol = VTCPolicy()
    a1, a2, a3 = seq("a"), seq("a"), seq("a")
    for s in (a1, a2, a3):
        pol.add(s, 0.0)
    admit(pol), admit(pol)
    pol.requeue(a2)
    assert list(pol.waiting()) == [a2, a3]
    assert pol.clients["a"].num_running == 1


def test_aborted_waiting_request_is_not_charged():
    cfg = SchedulerConfig(num_pages=20, page_size=4, max_num_seqs=1, max_prefill_tokens=64)
    pol = VTCPolicy()
    sched = Scheduler(cfg, pol)
    a = Sequence(seq_id=1, prompt_token_ids=[1] * 9, max_tokens=5, client_id="x")
    b = Sequence(seq_id=2, prompt_token_ids=[1] * 9, max_tokens=5, client_id="y")
    sched.add(a), sched.add(b)
    sched.schedule()
    sched.abort(2)
    assert pol.clients["y"].charged == 0 and len(pol) == 0
    sched.abort(1)  # a running request keeps what it was charged
    assert pol.clients["x"].charged == 9 and pol.clients["x"].num_running == 0


def test_oracle_prediction_charges_up_front_and_refunds_over_prediction():
    pol = make_policy("vtc-oracle")
    a = seq("a", n_p=10, max_tokens=50)
    a.extra[TRUE_OUTPUT_LEN] = 5
    pol.add(a, 0.0)
    admit(pol)
    assert pol.clients["a"].counter == 10 + 2 * 5
    produce(pol, [a], 5)
    assert pol.clients["a"].counter == 20   # tokens within the prediction are prepaid
    produce(pol, [a], 2)
    assert pol.clients["a"].counter == 24   # beyond it they are charged
    b = seq("b", n_p=10, max_tokens=50)
    b.extra[TRUE_OUTPUT_LEN] = 8
    pol.add(b, 0.0)
    admit(pol)
    produce(pol, [b], 3)
    a.finish_reason = b.finish_reason = FinishReason.STOP
    pol.on_finish(b)                        # stopped early: refund 5 predicted tokens
    assert pol.clients["b"].charged == 10 + 2 * 3   # (its counter also holds a lift to a's)


def test_moving_average_predictor_seeds_then_averages():
    p = MovingAveragePredictor()
    s = seq("a")
    assert p.predict(s) == 0
    p.observe("a", 100)
    assert p.predict(s) == 100
    p.observe("a", 50)
    assert p.predict(s) == 90  # (4 * 100 + 50) / 5


def test_profiled_cost_charges_sum_to_h():
    cost = QuadraticCost(c0=3.0, c_p=2.0, c_q=1.0, c_pq=0.04, c_qq=0.03)
    pol = VTCPolicy(cost=cost)
    a = seq("a", n_p=20, max_tokens=30)
    pol.add(a, 0.0)
    admit(pol)
    produce(pol, [a], 30)
    assert pol.clients["a"].counter == pytest.approx(cost.h(20, 30))
    fitted = QuadraticCost.fit([(p, q, cost.h(p, q)) for p in (10, 50, 90) for q in (1, 40, 80)])
    assert fitted.h(33, 17) == pytest.approx(cost.h(33, 17), rel=1e-6)


def test_rebasing_keeps_counters_bounded_and_order_unchanged():
    pol = VTCPolicy(maintenance_interval_s=1.0)
    active = []
    for t in range(200):
        for c in ("a", "b"):
            pol.add(seq(c, n_p=500), float(t))
        while len(pol):
            active.append(admit(pol, float(t)))
        produce(pol, active, 1)
    total = sum(st.charged for st in pol.clients.values())
    assert total > 200_000
    assert max(st.counter for st in pol.clients.values()) < 5_000
    assert pol.rebase_offset > 90_000
    for st in pol.clients.values():
        assert st.counter == pytest.approx(st.lifted + st.charged - st.rebased)


def test_idle_clients_forgotten_after_ttl_but_not_running_ones():
    pol = VTCPolicy(client_ttl_s=30.0, maintenance_interval_s=1.0)
    old = seq("old")
    pol.add(old, 0.0)
    admit(pol, 0.0)
    pol.on_finish(old)
    busy = seq("busy")
    pol.add(busy, 0.0)
    admit(pol, 0.0)           # runs (and is the last to leave its queue) through the TTL
    pol.add(seq("new"), 100.0)
    assert "old" not in pol.clients
    assert "busy" in pol.clients and "new" in pol.clients


def test_rpm_rejects_over_limit_and_forgets_after_the_window():
    pol = make_policy("rpm", max_requests_per_window=2)
    pol.add(seq("a"), 0.0)
    pol.add(seq("a"), 10.0)
    with pytest.raises(RequestRejected):
        pol.add(seq("a"), 20.0)
    pol.add(seq("b"), 20.0)   # per client
    pol.add(seq("a"), 60.5)   # the first acceptance left the 60 s window
    assert [s.client_id for s in pol.waiting()] == ["a", "a", "b", "a"]
    assert pol.stats()["clients"]["a"]["rejected"] == 1


def test_factory_names_and_errors():
    for name in POLICY_NAMES:
        kw = {"fair_weights": {"a": 2.0}} if name == "wvtc" else {}
        assert make_policy(name, **kw).name == name
    assert make_policy("weighted", fair_weights={"a": 2}).name == "wvtc"
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_policy("sjf")
    with pytest.raises(ValueError, match="takes no option"):
        make_policy("fcfs", alpha=0.1)
    with pytest.raises(ValueError, match="positive"):
        make_policy("vtc", fair_weights={"a": 0.0})


def test_admission_round_is_a_few_heap_operations_with_many_clients(monkeypatch):
    # 1,000 clients and 10,000 waiting requests: an admission is a few O(log n) heap operations,
    # never a pass over every client. Counted, not timed, so a busy machine cannot fail it; the
    # timing benchmark is scripts/bench_scheduler.py.
    import heapq
    import types

    from scheduler import counter_heap
    pol = VTCPolicy()
    for i in range(10_000):
        pol.add(seq(f"c{i % 1000}", n_p=1 + i % 97), 0.0)
    ops = {"heappush": 0, "heappop": 0, "heapify": 0}

    def counted(name):
        def op(*args):
            ops[name] += 1
            return getattr(heapq, name)(*args)
        return op
    monkeypatch.setattr(counter_heap, "heapq", types.SimpleNamespace(**{n: counted(n) for n in ops}))

    class Clients(dict):   # counts passes over every client
        def __iter__(self):
            ops["scans"] = ops.get("scans", 0) + 1
            return super().__iter__()

        def values(self):
            return [self[k] for k in self]

        def items(self):
            return [(k, self[k]) for k in self]
    pol.clients = Clients(pol.clients)
    for _ in range(64):
        admit(pol)
    assert ops["heapify"] == 0 and "scans" not in ops, ops
    assert ops["heappush"] + ops["heappop"] <= 64 * 3, ops
