"""Prefix caching in the simulator: workloads with shared prefixes, token ids that share only
those, VTC's fairness bound with cached tokens charged at the cached-token weight, and the
two-tenant example of docs/fairness.md ("Prefix caching and the cached-token weight").

The bound is test_vtc_properties.py's: U = max(w_p * L_input, w_q * M); backlogged clients'
counters within U of each other at every step, and two clients backlogged throughout an
interval get (weighted) service within 2U. A cached prompt token only lowers the admission
charge (w_p * (n_p - n_c) + cached_token_weight * w_p * n_c <= w_p * L_input), so U stands.
"""
import json
import os
import pathlib
import sys

import pytest
from hypothesis import given, settings, strategies as st

from scheduler.cost_model import CostModel
from scheduler.factory import make_policy
from scheduler.simulator import PromptTokens, SimConfig, simulate
from scheduler.workload import Request, WorkloadError, generate, load_trace, validate

sys.path.insert(0, os.path.dirname(__file__))
from test_simulator_cli import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = 1e-6
W_P, W_Q = 1.0, 2.0


def _client(cid, **kw):
    return {"id": cid, "rate": 1.0, "input_len": 64, "output_len": 8, **kw}


# -- workloads -------------------------------------------------------------------------------
def test_workload_shared_prefix_and_groups():
    spec = {"clients": [_client("a", shared_prefix=32),
                        _client("b", shared_prefix=48, prefix_group="sys", input_len=[50, 90]),
                        _client("c", shared_prefix=48, prefix_group="sys"),
                        _client("d")]}
    reqs = generate(spec, 5)
    by = {c: [r for r in reqs if r.client == c] for c in "abcd"}
    assert {(r.prefix_id, r.prefix_tokens) for r in by["a"]} == {("client:a", 32)}
    assert {(r.prefix_id, r.prefix_tokens) for r in by["b"] + by["c"]} == {("group:sys", 48)}
    assert {(r.prefix_id, r.prefix_tokens) for r in by["d"]} == {(None, 0)}
    assert all(50 <= r.prompt_tokens <= 90 for r in by["b"]), "input_len includes the prefix"


@pytest.mark.parametrize("client, needle", [
    (_client("x", shared_prefix=0), "shared_prefix must be a positive int"),
    (_client("x", shared_prefix=8.0), "shared_prefix must be a positive int"),
    (_client("x", shared_prefix=64), "shared_prefix (64) must be shorter than every prompt"),
    (_client("x", shared_prefix=20, input_len=[16, 90]), "shortest 16"),
    (_client("x", prefix_group="g"), "prefix_group needs shared_prefix"),
    (_client("x", shared_prefix=8, prefix_group=""), "prefix_group must be a non-empty string"),
])
def test_workload_prefix_errors_name_the_problem(client, needle):
    with pytest.raises(WorkloadError) as e:
        validate({"clients": [client]}, "w.json")
    assert needle in str(e.value) and "client 'x'" in str(e.value) and "w.json" in str(e.value)


def test_workload_group_needs_one_prefix_length():
    spec = {"clients": [_client("a", shared_prefix=16, prefix_group="g"),
                        _client("b", shared_prefix=24, prefix_group="g")]}
    with pytest.raises(WorkloadError, match="prefix_group 'g' has shared_prefix 16 .client 'a'., "
                                            "not 24"):
        validate(spec)


def test_trace_prefix_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("client,arrival_s,prompt_tokens,output_tokens,prefix_id,prefix_tokens\n"
                 "a,1.0,40,4,sys,32\nb,2.0,40,4,,\n")
    assert load_trace(str(p)) == [Request("a", 1.0, 40, 4, "sys", 32), Request("b", 2.0, 40, 4)]
    p.write_text("client,arrival_s,prompt_tokens,output_tokens,prefix_id,prefix_tokens\n"
                 "a,1.0,40,4,sys,40\n")
    with pytest.raises(WorkloadError, match="line 2: prefix_tokens must be in"):
        load_trace(str(p))


def test_prompt_tokens_share_only_the_prefix():
    b = PromptTokens()
    x1, x2 = b.build(Request("a", 0, 20, 1, "p", 8)), b.build(Request("a", 0, 20, 1, "p", 8))
    y = b.build(Request("b", 0, 20, 1, "q", 8))
    longer = b.build(Request("c", 0, 30, 1, "p", 12))
    plain = b.build(Request("d", 0, 10, 1))
    assert x1[:8] == x2[:8] == longer[:8] and len(x1) == 20 and len(longer) == 30
    assert not set(x1[8:]) & set(x2[8:]), "the rest of each prompt is its own"
    assert not set(y) & set(x1) and not set(plain) & (set(x1) | set(x2) | set(y) | set(longer))


# -- the simulator ---------------------------------------------------------------------------
SMALL = {"clients": [
    {"id": "a", "rate": 2.0, "input_len": [100, 160], "output_len": [8, 32], "shared_prefix": 96},
    {"id": "b", "rate": 2.0, "input_len": [100, 160], "output_len": [8, 32], "shared_prefix": 64,
     "prefix_group": "g"},
    {"id": "c", "rate": 2.0, "input_len": [100, 160], "output_len": [8, 32], "shared_prefix": 64,
     "prefix_group": "g"},
    {"id": "d", "rate": 2.0, "input_len": [100, 160], "output_len": [8, 32]}]}


def _small_config(**kw):
    return SimConfig(duration_s=30.0, kv_capacity_tokens=2000, page_size=16, max_num_seqs=32,
                     max_prefill_tokens=512, **kw)


def test_caching_off_ignores_prefixes_and_on_hits_and_prefills_less():
    reqs = generate(SMALL, 30, seed=3)
    plain = [Request(r.client, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs]
    off = simulate(reqs, make_policy("vtc"), _small_config(enable_prefix_caching=False))
    base = simulate(plain, make_policy("vtc"), _small_config(enable_prefix_caching=False))
    assert off.service == base.service and off.hit_rate() == 0.0 and off.prefix_cache == {}
    on = simulate(reqs, make_policy("vtc", cached_token_weight=0.1),
                  _small_config(enable_prefix_caching=True, cached_token_weight=0.1))
    assert on.hit_rate("a") > 0.5 and on.hit_rate("b") > 0.3 and on.hit_rate("c") > 0.3
    assert on.hit_rate("d") == 0.0, "requests without a shared prefix never hit"
    assert on.prefix_cache["hits"] > 0
    # the same first requests prefill fewer tokens, and over the run more requests are served
    assert sum(on.prefill_tokens.values()) < sum(off.prefill_tokens.values())
    n = min(len(on.cached_tokens), len(off.cached_tokens))
    per_req_on = sum(on.prefill_tokens.values()) / len(on.cached_tokens)
    per_req_off = sum(off.prefill_tokens.values()) / len(off.cached_tokens)
    assert per_req_on < 0.7 * per_req_off and n > 20
    # the recorded service of every admitted prompt: w_p per computed token, 0.1 w_p per cached
    seqs = {s.seq_id: s for s in on.seqs}
    prompt_service = sum(W_P * (seqs[i].num_prompt_tokens - c) + 0.1 * W_P * c
                         for i, c in on.cached_tokens.items())
    delivered = sum(sum(v) for v in on.service.values())
    outputs = W_Q * sum(s.num_output_tokens for s in on.seqs)
    # (a prompt admitted in the last step may not be fully prefilled before the clock stops)
    assert delivered <= prompt_service + outputs + EPS
    assert delivered >= prompt_service + outputs - W_P * 512 - EPS


def test_simulator_refuses_a_policy_charging_another_cached_weight():
    with pytest.raises(ValueError, match="cached_token_weight is 0.1"):
        simulate([], make_policy("vtc", cached_token_weight=1.0),
                 _small_config(enable_prefix_caching=True, cached_token_weight=0.1))


client_st = st.fixed_dictionaries({
    "rate": st.floats(0.2, 3.0),
    "arrival": st.sampled_from(["uniform", "poisson", "on-off"]),
    "input_len": st.integers(40, 300),
    "output_len": st.one_of(st.integers(1, 120), st.tuples(st.integers(1, 20), st.integers(20, 120)).map(list)),
    "prefix_frac": st.sampled_from([0.0, 0.5, 0.9]),
    "prefix_group": st.sampled_from([None, None, "g"]),
    "weight": st.sampled_from([1.0, 1.0, 2.0]),
    "start_s": st.floats(0.0, 5.0),
})


@st.composite
def prefix_workloads(draw):
    clients = draw(st.lists(client_st, min_size=2, max_size=4))
    group_len = None
    for i, c in enumerate(clients):
        c["id"] = f"c{i}"
        c["on_s"], c["off_s"] = 8.0, 8.0
        frac, group = c.pop("prefix_frac"), c.pop("prefix_group")
        if frac:
            n = max(1, int(frac * c["input_len"]))
            if group is not None:
                group_len = group_len or n
                if group_len < c["input_len"]:
                    c["shared_prefix"], c["prefix_group"] = group_len, group
                    continue
            c["shared_prefix"] = n
    return {"duration_s": 40.0, "clients": clients}


def _run_bounded(spec, seed, cached_weight, is_weighted, is_reserve=True):
    """Simulate with caching on and assert the U / 2U bounds at every step (2U / 4U with
    preemption, as test_vtc_properties does) and that every counter unit is service delivered
    at the cached-token weight; returns the result."""
    cfg = SimConfig(duration_s=40.0, kv_capacity_tokens=1200, page_size=8, max_num_seqs=32,
                    max_prefill_tokens=256, enable_prefix_caching=True,
                    cached_token_weight=cached_weight, is_reserve_output=is_reserve)
    requests = generate(spec, seed=seed)
    weights = {c["id"]: c["weight"] for c in spec["clients"]} if is_weighted else None
    policy = make_policy("wvtc" if is_weighted else "vtc", fair_weights=weights,
                         cached_token_weight=cached_weight)
    bound_u = max(W_P * max((r.prompt_tokens for r in requests), default=0),
                  W_Q * cfg.kv_capacity_tokens)
    if is_weighted:
        bound_u /= min(weights.values())
    if not is_reserve:
        bound_u *= 2
    stretch: dict[tuple[str, str], tuple[float, float]] = {}

    def on_step(now, plan, sched):
        pol = getattr(sched.policy, "inner", sched.policy)
        backlogged = [c for c in pol.clients.values() if c.queue]
        if len(backlogged) >= 2:
            spread = max(c.counter for c in backlogged) - min(c.counter for c in backlogged)
            assert spread <= bound_u + EPS, f"counter spread {spread} > U={bound_u}"
        ids = sorted(c.client_id for c in backlogged)
        live = set()
        for i, f in enumerate(ids):
            for g in ids[i + 1:]:
                d = pol.clients[f].charged - pol.clients[g].charged
                lo, hi = stretch.get((f, g), (d, d))
                lo, hi = min(lo, d), max(hi, d)
                stretch[(f, g)] = (lo, hi)
                live.add((f, g))
                assert hi - lo <= 2 * bound_u + EPS, f"service of {f},{g} differs by {hi - lo} > 2U"
        for key in list(stretch):
            if key not in live:
                del stretch[key]

    res = simulate(requests, policy, cfg, CostModel(), on_step=on_step)
    for cid, cs in policy.clients.items():
        seqs = [s for s in res.seqs if s.client_id == cid and s.is_prefill_charged]
        delivered = sum(W_P * (s.num_prompt_tokens - res.cached_tokens[s.seq_id])
                        + cached_weight * W_P * res.cached_tokens[s.seq_id] for s in seqs)
        delivered += W_Q * sum(s.num_output_tokens for s in res.seqs if s.client_id == cid)
        assert abs(cs.charged * cs.weight - delivered) <= EPS * max(1.0, delivered)
    return res


@settings(max_examples=12, deadline=None)
@given(prefix_workloads(), st.integers(0, 1000), st.sampled_from([0.0, 0.1, 1.0]),
       st.booleans())
def test_vtc_bounds_hold_with_prefix_caching(spec, seed, cached_weight, is_weighted):
    _run_bounded(spec, seed, cached_weight, is_weighted)


@settings(max_examples=6, deadline=None)
@given(prefix_workloads(), st.integers(0, 1000), st.sampled_from([0.0, 0.1, 1.0]))
def test_vtc_bounds_with_prefix_caching_and_preemption(spec, seed, cached_weight):
    _run_bounded(spec, seed, cached_weight, False, is_reserve=False)


def test_bounded_setup_does_hit():
    spec = {"duration_s": 40.0, "clients": [
        {"id": "a", "rate": 3.0, "input_len": 200, "output_len": 40, "shared_prefix": 160},
        {"id": "b", "rate": 3.0, "input_len": 200, "output_len": 40, "shared_prefix": 100,
         "prefix_group": "g"},
        {"id": "c", "rate": 3.0, "input_len": 120, "output_len": 40, "shared_prefix": 100,
         "prefix_group": "g"}]}
    res = _run_bounded(spec, 0, 0.1, False)
    assert res.hit_rate() > 0.4 and all(res.hit_rate(c) > 0 for c in "abc")
    res = _run_bounded(spec, 0, 0.1, False, is_reserve=False)
    assert res.hit_rate() > 0.4 and sum(s.num_preemptions for s in res.seqs) > 0


# -- the two-tenant example (docs/fairness.md) --------------------------------------------------
TWO = json.loads((ROOT / "scripts" / "workloads" / "prefix_two_tenants.json").read_text())


def _two_tenants(cached_weight, duration=120.0):
    policy = make_policy("vtc", cached_token_weight=cached_weight)
    res = simulate(generate(TWO, duration), policy,
                   SimConfig(duration_s=duration, enable_prefix_caching=True,
                             cached_token_weight=cached_weight))
    out = {}
    for c in "AB":
        seqs = [s for s in res.seqs if s.client_id == c]
        out[c] = {"charged": policy.clients[c].charged,
                  "admitted": sum(s.seq_id in res.cached_tokens for s in seqs),
                  "computed": res.prefill_tokens[c] + sum(s.num_output_tokens for s in seqs),
                  "hit_rate": res.hit_rate(c)}
    return out


def test_two_tenants_cached_weight_moves_the_split():
    runs = {w: _two_tenants(w) for w in (0.0, 0.1, 1.0)}
    for w, r in runs.items():
        a, b = r["A"], r["B"]
        assert a["hit_rate"] > 0.7 and b["hit_rate"] == 0.0
        assert abs(a["charged"] - b["charged"]) <= 2 * W_Q * 10000, "VTC: charges within 2U"
    # A request of A costs 256 + w * 768 + 2 * 128 in charge, one of B 1024 + 2 * 128: VTC
    # admits them in inverse proportion (within 10%; the first window's admissions blur it)
    for w, r in runs.items():
        expect = (1024 + 256) / (256 + w * 768 + 256)
        assert r["A"]["admitted"] / r["B"]["admitted"] == pytest.approx(expect, rel=0.1), w
    share = {w: r["A"]["computed"] / (r["A"]["computed"] + r["B"]["computed"])
             for w, r in runs.items()}
    assert share[0.0] > share[0.1] > share[1.0], "a cheaper cached token buys A more compute"
    assert share[1.0] < 0.5, "charged like B's, A's requests compute fewer tokens"


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_prefix_caching_flags(tmp_path, capsys):
    w = tmp_path / "w.json"
    w.write_text(json.dumps(SMALL))
    rc, out, err = cli(["--workload", str(w), "--duration", "10", "--scheduler", "vtc,lcf,fcfs",
                         "--enable-prefix-caching", "--cached-token-weight", "0", "--json"], capsys)
    assert rc == 0, err
    runs = json.loads(out)["schedulers"]
    for name in ("vtc", "lcf", "fcfs"):
        pc = runs[name]["prefix_cache"]
        assert pc["enabled"] and pc["cached_token_weight"] == 0.0 and pc["hit_rate"] > 0
        assert pc["scheduler"]["hits"] > 0
        assert runs[name]["clients"]["d"]["cached_prompt_tokens"] == 0
    rc, out, _ = cli(["--workload", str(w), "--duration", "10", "--enable-prefix-caching"], capsys)
    assert rc == 0 and "prefix cache: hit rate" in out and "cached-token weight 0.1" in out
    rc, out, _ = cli(["--workload", str(w), "--duration", "10", "--json"], capsys)
    assert json.loads(out)["schedulers"]["vtc"]["prefix_cache"]["hit_rate"] == 0.0
    rc, _, err = cli(["--workload", str(w), "--cached-token-weight", "2"], capsys)
    assert rc == 2 and "cached_token_weight must be in [0, 1]" in err and err.count("\n") == 1
    w.write_text(json.dumps({"clients": [_client("x", shared_prefix=64)]}))
    rc, _, err = cli(["--workload", str(w)], capsys)
    assert rc == 2 and "shared_prefix (64) must be shorter" in err and err.count("\n") == 1
