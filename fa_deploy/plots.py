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


def tradeoff_plot(rows: List[Dict], path: str, label_key: str = "model") -> str:
    """Clean AP50 (x) against advAP (y), one point per row; dotted lines of equal acAP = (clean + advAP) / 2."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    xs = [r["clean"] for r in rows]
    ys = [r["advAP"] for r in rows]
    hi = max(xs + ys + [0.1]) * 1.15
    for level in np.arange(0.1, 1.01, 0.1):
        if level * 2 > 2 * hi:
            break
        xx = np.linspace(0, hi, 50)
        ax.plot(xx, 2 * level - xx, ":", color="grey", linewidth=0.7)
        if 0 < 2 * level - hi * 0.98 < hi:
            ax.text(hi * 0.98, 2 * level - hi * 0.98, f"acAP {level:.2f}", fontsize=6, color="grey", ha="right")
        elif 2 * level < hi:
            ax.text(0.01 * hi, 2 * level - 0.01 * hi, f"acAP {level:.2f}", fontsize=6, color="grey")
    for r, x, y in zip(rows, xs, ys):
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(str(r.get(label_key, "?")), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
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
