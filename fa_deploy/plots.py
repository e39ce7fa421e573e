"""Plots (matplotlib, PNG): the clean/robust trade-off with acAP iso-lines (the paper's Figure 2 style), AP50
against PGD steps, and the per-backend drop of a deployment against its source."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def _nice_step(span: float) -> float:
    for step in (0.005, 0.01, 0.02, 0.05, 0.1):
        if span / step <= 10:
            return step
    return 0.1


def tradeoff_plot(rows: List[Dict], path: str, label_key: str = "model") -> str:
    """Clean AP50 (x) against advAP (y), one point per row (with error bars where rows carry `clean_std` /
    `advAP_std`), zoomed on the points; dotted lines of equal acAP = (clean + advAP) / 2."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    xs = [r["clean"] for r in rows]
    ys = [r["advAP"] for r in rows]
    dx = [r.get("clean_std", 0.0) for r in rows]
    dy = [r.get("advAP_std", 0.0) for r in rows]
    x0, x1 = min(x - d for x, d in zip(xs, dx)), max(x + d for x, d in zip(xs, dx))
    y0, y1 = min(y - d for y, d in zip(ys, dy)), max(y + d for y, d in zip(ys, dy))
    padx, pady = max(0.02, 0.1 * (x1 - x0)), max(0.02, 0.1 * (y1 - y0))
    xlim = (max(0.0, x0 - padx), min(1.0, x1 + padx))
    ylim = (max(0.0, y0 - pady), min(1.0, y1 + pady))
    lo, hi = (xlim[0] + ylim[0]) / 2, (xlim[1] + ylim[1]) / 2
    step = _nice_step(hi - lo)
    xx = np.linspace(*xlim, 50)
    for level in np.arange(np.ceil(lo / step) * step, hi, step):
        ax.plot(xx, 2 * level - xx, ":", color="grey", linewidth=0.7)
        y_at_right = 2 * level - xlim[1]
        if ylim[0] <= y_at_right <= ylim[1]:
            ax.text(xlim[1], y_at_right, f"acAP {level:.3g} ", fontsize=6, color="grey", va="bottom", ha="right")
    offsets = [(5, 4), (5, -10), (-40, 4), (-40, -10)]
    for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
        if "clean_std" in r or "advAP_std" in r:
            ax.errorbar([x], [y], xerr=[r.get("clean_std", 0.0)], yerr=[r.get("advAP_std", 0.0)], fmt="o",
                        capsize=3, zorder=3)
        else:
            ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(str(r.get(label_key, "?")), (x, y), textcoords="offset points", xytext=offsets[i % 4],
                    fontsize=8)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("clean AP50")
    ax.set_ylabel("advAP (mean AP50 over PGD steps)")
    ax.set_title("clean against adversarial AP50 (dotted: equal acAP)", fontsize=9)
    ax.grid(alpha=0.2)
    return _save(fig, path)


def steps_plot(rows: List[Dict], steps: Sequence[int], path: str, label_key: str = "model") -> str:
    """AP50 against the number of PGD steps (0 = clean), one line per row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    xs = [0] + list(steps)
    for r in rows:
        ys = [r["clean"]] + [r.get(f"PGD-{k}", float("nan")) for k in steps]
        ax.plot(xs, ys, marker="o", label=str(r.get(label_key, "?")))
    ax.set_xticks(xs)
    ax.set_xlabel("PGD steps (0 = clean)")
    ax.set_ylabel("AP50")
    ax.set_ylim(bottom=0)
    ax.set_title("AP50 under PGD-k attacks", fontsize=9)
    ax.grid(alpha=0.2)
    ax.legend(fontsize=7)
    return _save(fig, path)


def drop_plot(rows: List[Dict], path: str, max_drop: float) -> str:
    """Per deployed backend: the drop of clean AP50 and advAP against the source, with the gate's threshold."""
    plt = _plt()
    rows = [r for r in rows if "drop_clean" in r and r.get("format") != "torch"]
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    names = [str(r["backend"]) for r in rows] or ["(no backend)"]
    x = np.arange(len(names))
    clean = [r.get("drop_clean", 0.0) for r in rows] or [0.0]
    adv = [r.get("drop_advAP", np.nan) for r in rows] or [0.0]
    ax.bar(x - 0.18, clean, 0.36, label="clean AP50 drop")
    ax.bar(x + 0.18, adv, 0.36, label="advAP drop")
    ax.axhline(max_drop, color="red", linestyle="--", linewidth=1, label=f"gate: max drop {max_drop:g}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("source minus backend (AP50)")
    ax.set_title("robustness a deployment loses", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
