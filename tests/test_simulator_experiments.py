"""The paper's experiments (vtc.md's table) in the simulator, each asserting the qualitative
outcome the paper reports. Durations are shortened where the outcome shows early; the cost
model and KV capacity are the paper's (37 ms decode step, 0.215 ms/token prefill, M = 10000).
Tolerances are written next to each assertion."""
import functools
import json
import pathlib

import pytest

from scheduler.factory import make_policy
from scheduler.sim_metrics import summarize, window_sums
from scheduler.simulator import SimConfig, simulate
from scheduler.workload import generate, load_trace

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "data" / "lmsys_arena_trace.csv"
M, W_Q = 10000, 2.0
U = W_Q * M  # prompts here are at most 1021 tokens, so w_q * M dominates


def spec(name):
    return json.loads((ROOT / "scripts" / "workloads" / f"{name}.json").read_text())


@functools.lru_cache(maxsize=None)
def run(workload, scheduler, duration, weighted=False):
    s = spec(workload)
    weights = {c["id"]: c.get("weight", 1.0) for c in s["clients"]} if weighted else None
    res = simulate(generate(s, duration), make_policy(scheduler, fair_weights=weights),
                   SimConfig(duration_s=duration))
    return res, summarize(res, 60.0, weights)


def per_window(summary, client):
    return summary["clients"][client]["service_per_window"]


def ttft_of(res, client, t0=0.0, t1=float("inf")):
    lat = [s.first_token_time - s.arrival_time for s in res.seqs
           if s.client_id == client and t0 <= s.arrival_time < t1 and s.first_token_time is not None]
    return sum(lat) / len(lat)


def test_overload_vtc_equal_service_fcfs_one_to_two():
    _, vtc = run("overload", "vtc", 240)
    _, fcfs = run("overload", "fcfs", 240)
    for a, b in list(zip(per_window(vtc, "A"), per_window(vtc, "B")))[1:]:
        assert abs(a - b) <= 0.1 * max(a, b), "VTC: equal service per window (10%)"
    ratio = sum(per_window(fcfs, "B")) / sum(per_window(fcfs, "A"))
    assert 1.8 <= ratio <= 2.2, f"FCFS: service follows the 1:2 arrival rates, got 1:{ratio:.2f}"
    acc_v, acc_f = vtc["accumulated_service_difference"], fcfs["accumulated_service_difference"]
    assert acc_v["max"] <= 2 * U, "VTC: accumulated difference within the 2U theorem"
    ev = acc_f["every_window"]
    assert ev[-1] >= 3.5 * ev[0] and ev[-1] > 5 * U, "FCFS: difference grows linearly"


def test_proportional_light_clients_get_their_demand_with_low_latency():
    res, s = run("proportional", "vtc", 240)
    fres, _ = run("proportional", "fcfs", 240)
    for c in ("A", "B"):
        v = s["clients"][c]
        assert v["num_started"] >= v["num_requests"] - 1, f"VTC serves all of light client {c}"
        assert ttft_of(res, c) < 2.0, "VTC: light clients see low first-token latency (< 2 s)"
        assert ttft_of(fres, c) > 10 * ttft_of(res, c), "FCFS queues light clients behind C"
    assert ttft_of(res, "C") > 10 * ttft_of(res, "A"), "the heavy client absorbs the queueing"


def test_on_off_returning_client_is_served_at_once():
    res, s = run("on_off", "vtc", 360)
    fres, _ = run("on_off", "fcfs", 360)
    for on_start in (120.0, 240.0):  # A's later on-periods, after B built a backlog
        early_vtc = ttft_of(res, "A", on_start, on_start + 10)
        early_fcfs = ttft_of(fres, "A", on_start, on_start + 10)
        assert early_vtc < 3.0, f"VTC: A served at once when it returns ({early_vtc:.1f} s)"
        assert early_fcfs > 20.0, f"FCFS: A waits behind B's backlog ({early_fcfs:.1f} s)"
        w = int(on_start // 60)
        demand = 0.6 * 60 * (256 + W_Q * 256)
        assert per_window(s, "A")[w] >= 0.9 * demand, "VTC: A gets its demand while on (10%)"


@pytest.mark.parametrize("workload", ["short_long", "input_output"])
def test_short_vs_long_equal_weighted_service(workload):
    _, vtc = run(workload, "vtc", 240)
    _, fcfs = run(workload, "fcfs", 240)
    a, b = (c for c in vtc["clients"])
    va, vb = sum(per_window(vtc, a)[1:]), sum(per_window(vtc, b)[1:])
    fa, fb = sum(per_window(fcfs, a)[1:]), sum(per_window(fcfs, b)[1:])
    assert abs(va - vb) <= 0.05 * max(va, vb), "VTC: equal service (5%) in tokens weighted 1:2"
    ca, cb = spec(workload)["clients"]
    demand = [c["rate"] * (c["input_len"] + W_Q * c["output_len"]) for c in (ca, cb)]
    assert demand[0] / demand[1] != pytest.approx(1.0, rel=0.2), "the workload is unbalanced"
    assert fa / fb == pytest.approx(demand[0] / demand[1], rel=0.1), "FCFS: service follows demand"


def test_increase_constant_client_keeps_its_demand():
    res, s = run("increase", "vtc", 300)
    fres, _ = run("increase", "fcfs", 300)
    v = s["clients"]["A"]
    assert v["num_started"] >= v["num_requests"] - 1, "VTC: A's every request is served"
    assert ttft_of(res, "A", 200, 300) < 1.0, "VTC: A's latency stays low as B ramps up"
    assert ttft_of(fres, "A", 200, 300) > 5 * ttft_of(res, "A", 200, 300), "FCFS: A suffers"


def test_distribution_shift_lcf_spends_banked_credit_vtc_stays_fair():
    _, vtc = run("distribution_shift", "vtc", 900)
    _, lcf = run("distribution_shift", "lcf", 900)
    # Phase 2 (300-600 s, windows 5..9): everyone heavy.
    for w in range(5, 10):
        row = [per_window(vtc, c)[w] for c in "ABC"]
        assert max(row) - min(row) <= 0.1 * max(row), f"VTC fair in phase 2, window {w} (10%)"
    a, b, c = (per_window(lcf, x)[5] for x in "ABC")
    assert b < 0.25 * a and c < 0.25 * a, "LCF: A spends credit banked in phase 1, starving B and C"


def test_weighted_service_in_ratio_1_2_3_4():
    _, wvtc = run("weighted", "wvtc", 240, weighted=True)
    _, vtc = run("weighted", "vtc", 240)
    totals = [sum(per_window(wvtc, f"w{k}")[1:]) for k in (1, 2, 3, 4)]
    for k, t in enumerate(totals, start=1):
        assert t / totals[0] == pytest.approx(k, rel=0.1), f"w{k}: ratio {t / totals[0]:.2f} (10%)"
    flat = [sum(per_window(vtc, f"w{k}")[1:]) for k in (1, 2, 3, 4)]
    # Four clients share ~20k service per window, so the 2U = 40k theorem is loose here; the
    # spread measured is 9%, asserted with a 12% tolerance.
    assert max(flat) - min(flat) <= min(2 * U, 0.12 * max(flat)), "unweighted VTC ignores weights"


@pytest.mark.skipif(not TRACE.exists(), reason="shared trace not present")
def test_real_trace_vtc_fairer_than_fcfs_and_rpm_at_the_same_throughput():
    requests = load_trace(str(TRACE))
    out = {}
    for name in ("vtc", "fcfs", "rpm"):
        out[name] = summarize(simulate(requests, make_policy(name), SimConfig(duration_s=600)))
    diff = {n: s["backlogged_service_difference_mean"] for n, s in out.items()}
    assert diff["vtc"] < 0.5 * diff["fcfs"] and diff["vtc"] < 0.5 * diff["rpm"], diff
    tput = {n: s["throughput"]["output_tokens_per_s"] for n, s in out.items()}
    assert tput["vtc"] >= 0.97 * tput["fcfs"], tput
    assert sum(c["num_rejected"] for c in out["rpm"]["clients"].values()) > 0


@pytest.mark.parametrize("name", ["vtc-oracle", "vtc-predict"])
def test_length_prediction_variants_are_fair_under_overload(name):
    _, s = run("overload", name, 240)
    a, b = sum(per_window(s, "A")[1:]), sum(per_window(s, "B")[1:])
    assert abs(a - b) <= 0.1 * max(a, b), f"{name}: equal service (10%)"


def test_window_sums():
    assert window_sums([1, 2, 3, 4, 5], 2) == [3, 7, 5]
