"""What the paper measures, computed from a `SimResult`.

- service per client per window (default 60 s), W = w_p * input + w_q * output tokens;
- accumulated service difference max_j W_j(0,t)/wt_j - min_j W_j(0,t)/wt_j over time;
- backlogged service difference: per window, max - min service among the clients that had
  a request waiting for at least `backlog_frac` of the window (only they are owed equal
  service), averaged over windows with two or more such clients;
- first-token latency per client (arrival to first output token), throughput;
- prefix caching: per client and in total, prompt tokens of admitted requests, how many were
  served from cache (the hit rate) and the prefill tokens computed (recomputes included).
"""
from __future__ import annotations

import statistics

from scheduler.simulator import SimResult


def window_sums(series: list[float], bins_per_window: int) -> list[float]:
    return [sum(series[k:k + bins_per_window]) for k in range(0, len(series), bins_per_window)]


def accumulated_difference(res: SimResult, weights: dict[str, float] | None = None) -> list[float]:
    """max - min over clients of cumulative (weighted) service, at the end of every bin."""
    weights = weights or {}
    totals = {c: 0.0 for c in res.clients}
    out = []
    num_bins = len(next(iter(res.service.values()), []))
    for b in range(num_bins):
        for c in res.clients:
            totals[c] += res.service[c][b] / weights.get(c, 1.0)
        out.append(max(totals.values()) - min(totals.values()) if totals else 0.0)
    return out


def backlogged_differences(res: SimResult, window_s: float = 60.0, backlog_frac: float = 0.5,
                           weights: dict[str, float] | None = None) -> list[float | None]:
    weights = weights or {}
    k = max(1, round(window_s / res.config.bin_s))
    svc = {c: window_sums(res.service[c], k) for c in res.clients}
    blg = {c: window_sums(res.backlogged_s[c], k) for c in res.clients}
    out = []
    for w in range(len(next(iter(svc.values()), []))):
        owed = [svc[c][w] / weights.get(c, 1.0) for c in res.clients
                if blg[c][w] >= backlog_frac * window_s]
        out.append(max(owed) - min(owed) if len(owed) >= 2 else None)
    return out


def summarize(res: SimResult, window_s: float = 60.0,
              weights: dict[str, float] | None = None) -> dict:
    k = max(1, round(window_s / res.config.bin_s))
    by_client: dict[str, list] = {c: [] for c in res.clients}
    for s in res.seqs:
        by_client[s.client_id].append(s)
    clients = {}
    num_output = 0
    for c in res.clients:
        seqs = by_client[c]
        prompt, cached = res.prompt_tokens_admitted(c)
        lat = sorted(s.first_token_time - s.arrival_time for s in seqs
                     if s.first_token_time is not None)
        num_output += sum(s.num_output_tokens for s in seqs)
        clients[c] = {
            "service_per_window": [round(x, 3) for x in window_sums(res.service[c], k)],
            "service_total": round(sum(res.service[c]), 3),
            "weight": (weights or {}).get(c, 1.0),
            "num_requests": len(seqs),
            "num_rejected": res.rejected.get(c, 0),
            "num_started": len(lat),
            "num_finished": sum(1 for s in seqs if s.seq_id in res.finish_time),
            "output_tokens": sum(s.num_output_tokens for s in seqs),
            "prompt_tokens": prompt,
            "cached_prompt_tokens": cached,
            "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "prefill_tokens_computed": res.prefill_tokens.get(c, 0),
            "first_token_latency_s": {
                "mean": round(statistics.fmean(lat), 4) if lat else None,
                "p50": round(lat[len(lat) // 2], 4) if lat else None,
                "p90": round(lat[int(len(lat) * 0.9)], 4) if lat else None},
        }
    acc = accumulated_difference(res, weights)
    blg = [d for d in backlogged_differences(res, window_s, weights=weights) if d is not None]
    end = res.end_s or res.config.duration_s
    prompt, cached = res.prompt_tokens_admitted()
    return {
        "window_s": window_s,
        "clients": clients,
        "accumulated_service_difference": {
            "final": round(acc[-1], 3) if acc else 0.0, "max": round(max(acc), 3) if acc else 0.0,
            "every_window": [round(acc[min(len(acc) - 1, j + k - 1)], 3)
                             for j in range(0, len(acc), k)]},
        "backlogged_service_difference_mean": round(statistics.fmean(blg), 3) if blg else None,
        "throughput": {"output_tokens_per_s": round(num_output / end, 3),
                       "service_per_s": round(sum(sum(v) for v in res.service.values()) / end, 3),
                       "busy_fraction": round(res.busy_s / end, 4), "num_steps": res.num_steps},
        "simulated_s": round(end, 3),
        "prefix_cache": {"enabled": res.config.enable_prefix_caching,
                         "cached_token_weight": res.config.cached_token_weight,
                         "prompt_tokens": prompt, "cached_prompt_tokens": cached,
                         "hit_rate": round(cached / prompt, 4) if prompt else 0.0,
                         "prefill_tokens_computed": sum(res.prefill_tokens.values()),
                         "scheduler": res.prefix_cache},
        "policy_stats": res.policy_stats,
    }
