"""`jaxserve simulate` (also `python -m scheduler.simulate_cli`): run a workload or a trace
through the scheduler with a step-time model and report fairness, latency and throughput.

The main CLI registers it with `add_arguments(subparser)` and calls `run(args)`.
Bad input (missing file, malformed JSON, unknown scheduler) prints one line naming the
problem and returns exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from scheduler.cost import DEFAULT_CACHED_TOKEN_WEIGHT
from scheduler.cost_model import CostModel
from scheduler.factory import POLICY_NAMES, make_policy
from scheduler.sim_metrics import summarize
from scheduler.simulator import SimConfig, simulate
from scheduler.workload import WorkloadError, generate, load_trace, load_workload


# policies that charge cached prompt tokens at a weight (those with service counters)
CACHED_WEIGHT_POLICIES = ("vtc", "wvtc", "weighted", "weighted-vtc", "vtc-weighted", "vtc-oracle",
                          "vtc-predict", "lcf")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", metavar="FILE.json", help="synthetic clients (see scheduler/workload.py)")
    src.add_argument("--trace", metavar="FILE.csv", help="client,arrival_s,prompt_tokens,output_tokens")
    p.add_argument("--scheduler", default="vtc",
                   help=f"policy, or a comma-separated list to compare: {', '.join(POLICY_NAMES)}")
    p.add_argument("--fair-weights", default=None, metavar="CLIENT=W,...",
                   help="client weights for VTC variants (default for wvtc: the workload's)")
    p.add_argument("--duration", type=float, default=None, help="simulated seconds (default: "
                   "the workload's duration_s, or the trace's last arrival)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic arrivals")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="draw service, difference and latency")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--window-s", type=float, default=60.0, help="service window (s)")
    p.add_argument("--w-p", type=float, default=1.0, help="cost weight of an input token")
    p.add_argument("--w-q", type=float, default=2.0, help="cost weight of an output token")
    p.add_argument("--rpm-limit", type=int, default=None, help="rpm: requests per client per minute")
    g = p.add_argument_group("engine model")
    g.add_argument("--cost-model", metavar="FILE.json", help="step-time coefficients from a calibration run")
    g.add_argument("--decode-step-s", type=float, default=None, help="decode step time, fixed part")
    g.add_argument("--decode-per-seq-s", type=float, default=None, help="decode step time per sequence")
    g.add_argument("--prefill-per-token-s", type=float, default=None, help="prefill time per token")
    g.add_argument("--kv-capacity", type=int, default=10000, help="KV cache capacity in tokens")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-prefill-tokens", type=int, default=4096)
    g.add_argument("--no-reserve", action="store_true", help="allocate pages as tokens arrive and "
                   "preempt when out (default: reserve prompt + max output at admission)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="reuse cached prompt prefixes (workload clients' shared_prefix; default: "
                   "off, unlike the engine: the workloads without shared prefixes run as before)")
    g.add_argument("--cached-token-weight", type=float, default=DEFAULT_CACHED_TOKEN_WEIGHT,
                   help="a prompt token served from cache costs this fraction of w_p, in VTC's "
                   "charge and in the measured service (default %(default)s)")


def parse_weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, w = item.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--fair-weights: expected CLIENT=WEIGHT, got {item!r}") from None
        if not sep or not name.strip() or out[name.strip()] <= 0:
            raise ValueError(f"--fair-weights: expected CLIENT=WEIGHT with WEIGHT > 0, got {item!r}")
    return out


def _cost_model(args) -> CostModel:
    base = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    d = base.to_dict()
    for flag, key in (("decode_step_s", "decode_base_s"), ("decode_per_seq_s", "decode_per_seq_s"),
                      ("prefill_per_token_s", "prefill_per_token_s")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    return CostModel(**d)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (WorkloadError, ValueError, OSError) as e:
        print(f"simulate: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    names = [n.strip() for n in args.scheduler.split(",") if n.strip()]
    if not names:
        raise ValueError("--scheduler is empty")
    weights = parse_weights(args.fair_weights)
    if args.workload:
        spec, spec_weights = load_workload(args.workload)
        duration = args.duration or float(spec.get("duration_s", 600))
        requests = generate(spec, duration, args.seed)
    else:
        requests = load_trace(args.trace)
        spec_weights = {}
        duration = args.duration or (requests[-1].arrival_s if requests else 1.0)
    cost_model = _cost_model(args)
    config = SimConfig(duration_s=duration, kv_capacity_tokens=args.kv_capacity,
                       page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                       max_prefill_tokens=args.max_prefill_tokens,
                       is_reserve_output=not args.no_reserve, w_p=args.w_p, w_q=args.w_q,
                       enable_prefix_caching=args.enable_prefix_caching,
                       cached_token_weight=args.cached_token_weight)
    runs, summaries = {}, {}
    for name in names:
        fair = weights or (spec_weights if name.lower() in ("wvtc", "weighted") else None)
        kw = {"max_requests_per_window": args.rpm_limit} if args.rpm_limit and name == "rpm" else {}
        if name.lower() in CACHED_WEIGHT_POLICIES:
            kw["cached_token_weight"] = args.cached_token_weight
        policy = make_policy(name, fair_weights=fair, w_p=args.w_p, w_q=args.w_q, **kw)
        runs[name] = simulate(requests, policy, config, cost_model)
        summaries[name] = summarize(runs[name], args.window_s, fair)
    if args.plot:
        from scheduler.sim_plot import plot_runs
        plot_runs(runs, args.plot, args.title, args.window_s, weights or None)
    if args.json:
        json.dump({"duration_s": duration, "num_requests": len(requests),
                   "cost_model": cost_model.to_dict(), "schedulers": summaries}, sys.stdout, indent=1)
        print()
    else:
        for name, s in summaries.items():
            _print_summary(name, s)
    return 0


def _print_summary(name: str, s: dict) -> None:
    acc = s["accumulated_service_difference"]
    print(f"== {name}: throughput {s['throughput']['output_tokens_per_s']:.1f} output tok/s, "
          f"accumulated service difference final {acc['final']:.0f} (max {acc['max']:.0f}), "
          f"backlogged difference per window {s['backlogged_service_difference_mean']}")
    pc = s["prefix_cache"]
    if pc["enabled"]:
        print(f"  prefix cache: hit rate {pc['hit_rate']:.3f} ({pc['cached_prompt_tokens']} of "
              f"{pc['prompt_tokens']} prompt tokens), {pc['prefill_tokens_computed']} prefill "
              f"tokens computed, cached-token weight {pc['cached_token_weight']}")
    print(f"  {'client':<12}{'service':>12}{'requests':>10}{'rejected':>10}{'started':>9}"
          f"{'finished':>10}{'ttft mean s':>13}{'prompt':>10}{'cached':>10}{'prefilled':>11}"
          f"{'output':>10}")
    for c, v in s["clients"].items():
        m = v["first_token_latency_s"]["mean"]
        print(f"  {c:<12}{v['service_total']:>12.0f}{v['num_requests']:>10}{v['num_rejected']:>10}"
              f"{v['num_started']:>9}{v['num_finished']:>10}"
              f"{(f'{m:.2f}' if m is not None else '-'):>13}{v['prompt_tokens']:>10}"
              f"{v['cached_prompt_tokens']:>10}{v['prefill_tokens_computed']:>11}"
              f"{v['output_tokens']:>10}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scheduler.simulate_cli", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
