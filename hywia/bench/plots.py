"""The bench's figures, drawn from its JSON record alone (so they can be redrawn without rerunning anything).

- widths: per layer, the attention heads and MLP channels each criterion kept, one row per ratio;
- agreement: per layer, how far fine- and coarse-grained rankings agree (Spearman) on the dense model;
- alpha: per layer, the weight the learned fusion gave each view it blends (by default fine and fluctuation).
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_MARKERS = "os^vD<>px*h"
_KIND_NAMES = {"head": "query heads", "kv": "KV groups", "mlp": "MLP channels"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_widths(record: dict, path: Path) -> Path | None:
    """Kept heads and MLP channels per layer for every criterion; lines that coincide stay visible because each
    later criterion is drawn thinner on top of the earlier ones."""
    ratios = list(dict.fromkeys(run["ratio"] for run in record["runs"]))
    if not ratios:
        return None
    dense = record["dense_widths"]
    fig, axes = plt.subplots(len(ratios), 2, figsize=(13, 3.4 * len(ratios)), squeeze=False)
    for row, ratio in zip(axes, ratios):
        runs = [run for run in record["runs"] if run["ratio"] == ratio]
        for ax, key, title in ((row[0], "num_attention_heads", "query heads"),
                               (row[1], "intermediate_size", "MLP channels")):
            layers = range(len(dense))
            ax.plot(layers, [w[key] for w in dense], color="0.6", linestyle="--", linewidth=1, label="dense")
            widths = cycle([4.5, 3.8, 3.1, 2.5, 2.0, 1.6, 1.2, 0.9])
            for run, marker, width in zip(runs, cycle(_MARKERS), widths):
                ax.plot(layers, [w[key] for w in run["report"]["layers"]], marker=marker, markersize=3,
                        linewidth=width, alpha=0.85, label=run["label"])
            ax.set_title(f"{title} kept, ratio {ratio:g}")
            ax.set_xlabel("layer")
            ax.set_ylabel(title)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        row[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return _save(fig, path)


def plot_agreement(record: dict, path: Path) -> Path | None:
    """Spearman correlation of fine- (taylor-element1/2) and coarse-grained (taylor-vector) scores per layer."""
    rows = record.get("granularity_agreement", {}).get("per_layer", [])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        layers = [r["layer"] for r in mine]
        # element1 as a wide translucent band, element2 as a thin dashed line on top: both stay visible where
        # they coincide (the second-order term is often small).
        line = ax.plot(layers, [r["element1_vs_vector"] for r in mine], marker="o", markersize=5, linewidth=3.5,
                       alpha=0.45, label=f"{_KIND_NAMES.get(kind, kind)}: element1 vs vector")[0]
        ax.plot(layers, [r["element2_vs_vector"] for r in mine], marker="x", markersize=5, linewidth=1.2,
                linestyle="--", color=line.get_color(), label=f"{_KIND_NAMES.get(kind, kind)}: element2 vs vector")
    values = [r[k] for r in rows for k in ("element1_vs_vector", "element2_vs_vector")]
    ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_ylim(min(0.0, min(values) - 0.05), 1.05)
    ax.set_title("Fine- vs coarse-grained rank agreement on the dense model (1 = same ranking)")
    ax.set_xlabel("layer")
    ax.set_ylabel("Spearman correlation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_alpha(record: dict, path: Path) -> Path | None:
    """The learned blend per layer: each view's weight alpha (mean over the layer's groups), one panel per run of a
    learned-fusion criterion and structure kind; None when no run learned a blend."""
    runs = [run for run in record["runs"] if run["report"].get("fusion", {}).get("steps")]  # equal blends: no plot
    if not runs:
        return None
    kinds = list(dict.fromkeys(r["kind"] for run in runs for r in run["report"]["fusion"]["per_layer"]))
    fig, axes = plt.subplots(len(runs), len(kinds), figsize=(6.5 * len(kinds), 3.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        for ax, kind in zip(row, kinds):
            mine = [r for r in run["report"]["fusion"]["per_layer"] if r["kind"] == kind]
            layers = [r["layer"] for r in mine]
            views = list(mine[0]["alpha"]) if mine else []
            for view, marker in zip(views, cycle(_MARKERS)):
                ax.plot(layers, [r["alpha"][view] for r in mine], marker=marker, markersize=4, label=view)
            if views:
                ax.axhline(1 / len(views), color="0.6", linewidth=0.8, linestyle=":", label="initial weight")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{run['label']}, ratio {run['ratio']:g}: {_KIND_NAMES.get(kind, kind)}")
            ax.set_xlabel("layer")
            ax.set_ylabel("learned weight alpha")
            ax.grid(alpha=0.3)
        row[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
