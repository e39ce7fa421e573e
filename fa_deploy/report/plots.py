"""Plots (matplotlib, PNG): the clean/robust trade-off with acAP iso-lines (the paper's Figure 2 style; advAP or
the worst case over attacks), AP50 against PGD steps, the per-backend drop of a deployment against its source,
and `fa-bench --sanity`'s AP50 curves over eps and steps."""
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


def _separate_labels(fig, labels) -> None:
    """Move each point label down (in steps of its height) until it overlaps no label placed before it."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    placed = []
    for t in labels:
        for _ in range(4 * len(labels) + 4):
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(p) for p in placed):
                break
            dx, dy = t.xyann
            t.xyann = (dx, dy - (box.height * 72.0 / fig.dpi + 2))
        placed.append(t.get_window_extent(renderer))


def tradeoff_plot(rows: List[Dict], path: str, label_key: str = "model", y_key: str = "advAP") -> str:
    """Clean AP50 (x) against advAP (y; or `y_key`, e.g. "worst", the worst case over attacks), one point per row
    (with error bars where rows carry `clean_std` / `<y_key>_std`), zoomed on the points; dotted lines of equal
    acAP = (clean + y) / 2."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    xs = [r["clean"] for r in rows]
    ys = [r[y_key] for r in rows]
    dx = [r.get("clean_std", 0.0) for r in rows]
    dy = [r.get(f"{y_key}_std", 0.0) for r in rows]
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
        if "clean_std" in r or f"{y_key}_std" in r:
            ax.errorbar([x], [y], xerr=[r.get("clean_std", 0.0)], yerr=[r.get(f"{y_key}_std", 0.0)], fmt="o",
                        capsize=3, zorder=3)
        else:
            ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(str(r.get(label_key, "?")), (x, y), textcoords="offset points", xytext=offsets[i % 4],
                    fontsize=8)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    _separate_labels(fig, ax.texts[len(ax.texts) - len(rows):])
    ax.set_xlabel("clean AP50")
    ax.set_ylabel("advAP (mean AP50 over PGD steps)" if y_key == "advAP" else
                  "worst-case AP50 over attacks" if y_key == "worst" else y_key)
    ax.set_title(f"clean against adversarial AP50 (dotted: equal (clean + {y_key}) / 2)", fontsize=9)
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
    """Per deployed backend (and threat): the drop of clean AP50 and advAP against the source, with the gate's
    threshold."""
    plt = _plt()
    rows = [r for r in rows if "drop_clean" in r and r.get("format") != "torch"]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.55 * len(rows) + 2), 4.0), dpi=100)
    names = [str(r["backend"]) + (f" [{r['threat']}]" if r.get("threat") else "") for r in rows] or ["(no backend)"]
    x = np.arange(len(names))
    keys = [k for k in (rows[0] if rows else {"drop_clean": 0.0}) if k.startswith("drop_")]
    w = 0.72 / len(keys)
    for j, k in enumerate(keys):
        vals = [r.get(k, np.nan) for r in rows] or [0.0]
        ax.bar(x - 0.36 + w * (j + 0.5), vals, w, label=f"{k[5:]}{' AP50' if k == 'drop_clean' else ''} drop")
    ax.axhline(max_drop, color="red", linestyle="--", linewidth=1, label=f"gate: max drop {max_drop:g}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("source minus backend (AP50)")
    ax.set_title("robustness a deployment loses", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def sanity_plot(details: List[Dict], path: str) -> str:
    """`fa-bench --sanity`: AP50 against eps (left) and against APGD iterations (right), one line per checkpoint,
    the clean AP50 dotted, transfer (x), uniform noise (square) and the random search (triangle) at eps beside the
    white-box point; a curve that rises, or stays up at the largest eps, or a marker below the curve, points at
    gradient masking."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=100)
    for i, d in enumerate(details):
        c = d["curves"]
        color = f"C{i % 10}"
        a.plot([e for e, _ in c["eps_curve"]], [v for _, v in c["eps_curve"]], marker="o", color=color,
               label=d["name"])
        b.plot([k for k, _ in c["steps_curve"]], [v for _, v in c["steps_curve"]], marker="o", color=color,
               label=d["name"])
        for ax in (a, b):
            ax.axhline(c["clean"], color=color, linestyle=":", linewidth=0.8)
        for key, marker in (("transfer", "x"), ("noise", "s"), ("search", "^")):
            if c.get(key) is not None:  # points at --eps and the white-box iteration count, beside the curve
                b.scatter([c["iterations"]], [c[key]], marker=marker, color=color, zorder=3,
                          label=f"{d['name']}: {dict(noise='uniform noise', search='random search').get(key, key)}")
    a.set_xlabel("eps")
    a.set_xscale("log")
    a.set_title(f"AP50 against eps (APGD, {details[0]['curves']['iterations']} iterations)", fontsize=9)
    b.set_xlabel("APGD iterations")
    b.set_xscale("log")
    b.set_title(f"AP50 against iterations (eps {details[0]['curves']['eps']:g})", fontsize=9)
    values = [v for d in details for key in ("eps_curve", "steps_curve") for _, v in d["curves"][key]]
    values += [d["curves"]["clean"] for d in details]
    values += [d["curves"].get(k) or 0.0 for d in details for k in ("transfer", "noise", "search")]
    nothing = max(values, default=0.0) < 0.01  # all (near) zero: matplotlib would zoom on rounding noise
    for ax in (a, b):
        ax.set_ylabel("AP50")
        if nothing:
            ax.set_ylim(0.0, 1.0)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.2)
        ax.legend(fontsize=7)
    return _save(fig, path)
