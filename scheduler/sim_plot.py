"""Plots of simulator runs: one row per scheduler, with service per window, accumulated
service difference and first-token latency per client. matplotlib is imported lazily (Agg)
so the scheduler package never needs it."""
from __future__ import annotations

from scheduler.sim_metrics import accumulated_difference, window_sums
from scheduler.simulator import SimResult

_MAX_LEGEND = 8


def plot_runs(runs: dict[str, SimResult], path: str, title: str = "", window_s: float = 60.0,
              weights: dict[str, float] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(runs)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 2.6 * rows + 0.6), squeeze=False)
    for row, (name, res) in enumerate(runs.items()):
        k = max(1, round(window_s / res.config.bin_s))
        ax_s, ax_d, ax_l = axes[row]
        for c in res.clients:
            svc = window_sums(res.service[c], k)
            xs = [(j + 1) * window_s for j in range(len(svc))]
            label = c if res.clients.index(c) < _MAX_LEGEND else None
            ax_s.plot(xs, svc, marker=".", lw=1, label=label)
            pts = sorted((s.arrival_time, s.first_token_time - s.arrival_time)
                         for s in res.seqs if s.client_id == c and s.first_token_time is not None)
            lat = [[] for _ in svc]
            for t, v in pts:
                lat[min(int(t / window_s), len(lat) - 1)].append(v)
            ax_l.plot([x for x, v in zip(xs, lat) if v], [sum(v) / len(v) for v in lat if v],
                      marker=".", lw=1)
        acc = accumulated_difference(res, weights)
        ax_d.plot([(b + 1) * res.config.bin_s for b in range(len(acc))], acc, color="k", lw=1)
        ax_s.set_ylabel(f"{name}\nservice / {window_s:g} s")
        ax_d.set_ylabel("accumulated service diff")
        ax_l.set_ylabel("first-token latency (s)")
        if len(res.clients) <= _MAX_LEGEND or row == 0:
            ax_s.legend(fontsize=7, ncol=2)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
