"""PNG figures of a run (matplotlib, Agg backend). Each function takes the `endpoints` part of
results.json and returns the Figure, so its axes can be inspected; `write_all` saves them.
A figure with nothing to show still renders, with a note in place of the data."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="0.35")


def ttft(endpoints: dict):
    """Empirical CDF of TTFT per endpoint, with p50/p90/p99 marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_data = False
    for i, (name, ep) in enumerate(endpoints.items()):
        xs = sorted(r["ttft_s"] * 1000 for r in ep["requests"] if r["ok"])
        if not xs:
            ax.plot([], [], color=f"C{i}", label=f"{name} (no successful requests)")
            continue
        any_data = True
        color = f"C{i}"
        ys = [(k + 1) / len(xs) for k in range(len(xs))]
        ax.step(xs, ys, where="post", color=color, label=name)
        pct = ep["summary"]["ttft_ms"]
        for p, marker in (("p50", "o"), ("p90", "s"), ("p99", "^")):
            if pct.get(p) is not None:
                ax.plot([pct[p]], [int(p[1:]) / 100], marker=marker, color=color,
                        linestyle="none")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT distribution (markers: p50 o, p90 s, p99 ^)")
    ax.set_ylim(0, 1.05)
    if any_data:
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    else:
        _note(ax, "no successful requests")
    fig.tight_layout()
    return fig


def throughput(endpoints: dict):
    """Output tokens/s and requests/s per endpoint, side by side."""
    plt = _plt()
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(9, 4.5))
    names = list(endpoints)
    colors = [f"C{i}" for i in range(len(names))]
    for ax, key, ylabel, title in (
            (ax_tok, "output_tokens_per_s", "output tokens/s", "Output token throughput"),
            (ax_req, "requests_per_s", "requests/s", "Request throughput")):
        vals = [endpoints[n]["summary"].get(key) or 0.0 for n in names]
        bars = ax.bar(names, vals, color=colors)
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9)
        ax.set_xlabel("endpoint")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if not any(vals):
            _note(ax, "no successful requests")
        else:
            ax.set_ylim(0, max(vals) * 1.15)
    fig.tight_layout()
    return fig


def kept_ratio_per_layer(endpoints: dict):
    """Mean kept ratio per layer (grouped bars, one colour per endpoint)."""
    plt = _plt()
    data = {n: (ep.get("server") or {}).get("kept_ratio_per_layer") or {}
            for n, ep in endpoints.items()}
    data = {n: v for n, v in data.items() if v}
    num_layers = len({layer for v in data.values() for layer in v})
    fig, ax = plt.subplots(figsize=(max(7.0, 2 + 0.3 * num_layers * max(1, len(data))), 4.5))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean kept ratio (kept / prompt tokens)")
    ax.set_title("ZipVL kept ratio per layer")
    ax.set_ylim(0, 1.05)
    if not data:
        ax.set_xticks([])
        _note(ax, "no kvsparse metrics")
        fig.tight_layout()
        return fig
    layers = sorted({layer for v in data.values() for layer in v},
                    key=lambda x: (not x.lstrip("-").isdigit(),
                                   int(x) if x.lstrip("-").isdigit() else 0, x))
    all_names = list(endpoints)
    width = 0.8 / len(data)
    for k, name in enumerate(data):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(layers))]
        ys = [data[name].get(layer, 0.0) for layer in layers]
        ax.bar(xs, ys, width=width, label=name, color=f"C{all_names.index(name)}")
    ax.set_xticks(range(len(layers)), layers)
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


PLOTS = {"ttft.png": ttft, "throughput.png": throughput,
         "kept_ratio_per_layer.png": kept_ratio_per_layer}


def write_all(endpoints: dict, out_dir: Path) -> list[Path]:
    plt = _plt()
    paths = []
    for filename, fn in PLOTS.items():
        fig = fn(endpoints)
        path = Path(out_dir) / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
