"""VTC's guarantees (Sheng et al., OSDI 2024) checked on random workloads in the simulator.

U = max(w_p * L_input, w_q * M), M the KV capacity in tokens, L_input the longest prompt.
  - at every step, backlogged clients' counters are within U of each other (Lemma);
  - two clients backlogged throughout an interval get service within 2U (Theorem);
  - every counter increment is service delivered: counter = lifts + charges - rebases, and
    charges = w_p * prompts admitted + w_q * tokens produced, exactly;
  - one client's requests start in arrival order;
  - work conservation: whenever a request waits, the head of the queue does not fit.
Bounds are the theorems' own, plus 1e-6 for float rounding.
"""
from hypothesis import given, settings, strategies as st

from scheduler.cost_model import CostModel
from scheduler.factory import make_policy
from scheduler.simulator import SimConfig, simulate
from scheduler.workload import generate

EPS = 1e-6

client_st = st.fixed_dictionaries({
    "rate": st.floats(0.05, 3.0),
    "arrival": st.sampled_from(["uniform", "poisson", "on-off"]),
    "input_len": st.one_of(st.integers(1, 300), st.tuples(st.integers(1, 50), st.integers(50, 300)).map(list)),
    "output_len": st.one_of(st.integers(1, 200), st.tuples(st.integers(1, 20), st.integers(20, 200)).map(list)),
    "weight": st.sampled_from([1.0, 1.0, 2.0, 3.0]),
    "start_s": st.floats(0.0, 10.0),
})


@st.composite
def workloads(draw):
    clients = draw(st.lists(client_st, min_size=2, max_size=5))
    for i, c in enumerate(clients):
        c["id"] = f"c{i}"
        c["on_s"], c["off_s"] = 8.0, 8.0
    return {"duration_s": 40.0, "clients": clients}


def _config(is_reserve: bool) -> SimConfig:
    # A small pool and prefill budget so that memory limits and chunking both matter.
    return SimConfig(duration_s=40.0, kv_capacity_tokens=1200, page_size=8, max_num_seqs=32,
                     max_prefill_tokens=256, is_reserve_output=is_reserve)


def _inner(sched):
    return getattr(sched.policy, "inner", sched.policy)


def _run_checked(spec, seed, is_reserve, is_weighted, slack=1.0):
    cfg = _config(is_reserve)
    requests = generate(spec, seed=seed)
    weights = {c["id"]: c["weight"] for c in spec["clients"]} if is_weighted else None
    policy = make_policy("wvtc" if is_weighted else "vtc", fair_weights=weights)
    w_p, w_q = 1.0, 2.0
    max_input = max((r.prompt_tokens for r in requests), default=0)
    bound_u = max(w_p * max_input, w_q * cfg.kv_capacity_tokens)
    if is_weighted:
        bound_u /= min(weights.values())
    bound_u *= slack
    first_starts: dict[str, list[int]] = {}
    started: set[int] = set()
    # per pair of clients: (D at the start of the current common-backlog stretch: min, max)
    stretch: dict[tuple[str, str], tuple[float, float]] = {}
    worst = {"spread": 0.0, "interval": 0.0}

    def on_plan(now, plan, sched):
        pol, cfg_s = _inner(sched), sched.config
        for s in plan.seqs:
            if s.seq_id not in started:
                started.add(s.seq_id)
                first_starts.setdefault(s.client_id, []).append(s.seq_id)
        if len(sched.policy) == 0 or plan.preempted:
            return  # (a decode step that preempted frees pages only after its admission check)
        assert sched.running, "idle while requests wait"
        head = pol.peek()
        fits = (sched.allocator.can_allocate(sched.pages_for(head.num_tokens))
                and len(sched.running) < cfg_s.max_num_seqs
                and (not is_reserve or sched.policy.can_reserve(head))
                and not (plan.is_prefill and plan.num_tokens >= cfg_s.max_prefill_tokens))
        assert not fits, f"head request {head.seq_id} fits but was not admitted"

    def on_step(now, plan, sched):
        pol = _inner(sched)
        backlogged = [c for c in pol.clients.values() if c.queue]
        if len(backlogged) >= 2:
            spread = max(c.counter for c in backlogged) - min(c.counter for c in backlogged)
            worst["spread"] = max(worst["spread"], spread)
            assert spread <= bound_u + EPS, f"counter spread {spread} > U={bound_u}"
        ids = sorted(c.client_id for c in backlogged)
        live = set()
        for i, f in enumerate(ids):
            for g in ids[i + 1:]:
                d = pol.clients[f].charged - pol.clients[g].charged  # weighted service difference
                lo, hi = stretch.get((f, g), (d, d))
                lo, hi = min(lo, d), max(hi, d)
                stretch[(f, g)] = (lo, hi)
                live.add((f, g))
                worst["interval"] = max(worst["interval"], hi - lo)
                assert hi - lo <= 2 * bound_u + EPS, f"service of {f},{g} differs by {hi - lo} > 2U"
        for key in list(stretch):
            if key not in live:
                del stretch[key]  # the stretch ended: one of them stopped being backlogged

    res = simulate(requests, policy, cfg, CostModel(), on_step=on_step, on_plan=on_plan)
    # Requests of one client start in arrival order (seq ids are arrival indices).
    for cid, ids in first_starts.items():
        assert ids == sorted(ids), f"client {cid} started out of order: {ids}"
    # Counter increments are exactly the service delivered.
    pol = policy
    for cid, cs in pol.clients.items():
        seqs = [s for s in res.seqs if s.client_id == cid]
        delivered = (w_p * sum(s.num_prompt_tokens for s in seqs if s.is_prefill_charged)
                     + w_q * sum(s.num_output_tokens for s in seqs))
        assert abs(cs.charged * cs.weight - delivered) <= EPS * max(1.0, delivered)
        assert abs(cs.counter - (cs.lifted + cs.charged - cs.rebased)) <= 1e-6 * max(1.0, cs.charged)
    return res, worst


@settings(max_examples=25, deadline=None)
@given(workloads(), st.integers(0, 1000))
def test_vtc_bounds_hold_on_random_workloads(spec, seed):
    _run_checked(spec, seed, is_reserve=True, is_weighted=False)


@settings(max_examples=15, deadline=None)
@given(workloads(), st.integers(0, 1000))
def test_weighted_vtc_bounds_hold_on_random_workloads(spec, seed):
    _run_checked(spec, seed, is_reserve=True, is_weighted=True)


@settings(max_examples=15, deadline=None)
@given(workloads(), st.integers(0, 1000))
def test_vtc_bounds_with_preemption_within_twice_the_theorem(spec, seed):
    # Pages allocated as tokens arrive: preemption and recompute happen. The paper's proof
    # assumes no preemption: a requeued request makes its client backlogged again without a
    # lift, at a counter that grew while it ran, and we have seen the spread exceed U by a
    # few tokens (2407 vs U=2400). Empirically it stays within 2U (and intervals within 4U);
    # that is what is asserted here, not a theorem.
    _run_checked(spec, seed, is_reserve=False, is_weighted=False, slack=2.0)


def test_preemption_actually_happens_in_the_preemption_property_setup():
    spec = {"clients": [{"id": "a", "rate": 3.0, "input_len": 100, "output_len": 200},
                        {"id": "b", "rate": 3.0, "input_len": 100, "output_len": 200}]}
    res, worst = _run_checked(spec, 0, is_reserve=False, is_weighted=False, slack=2.0)
    assert sum(s.num_preemptions for s in res.seqs) > 0
    assert worst["spread"] > 0 and worst["interval"] > 0
