"""Aggregate several `fa-bench --json` files (one per seed) into one table: mean and sample standard deviation
per method and column, as Markdown and JSON.  Used by scripts/replicate_small.sh and scripts/reproduce_paper.sh.

    python scripts/replicate_table.py OUT_DIR seed1/bench.json seed2/bench.json ...
"""
from __future__ import annotations

import json
import os
import statistics
import sys

METRICS = ("clean", "PGD-1", "PGD-3", "PGD-5", "PGD-10", "advAP", "acAP")


def aggregate(tables: list[dict]) -> dict:
    values: dict[str, dict[str, list[float]]] = {}
    for t in tables:
        for row in t["rows"]:
            per = values.setdefault(row["method"], {})
            for k in METRICS:
                if isinstance(row.get(k), (int, float)):
                    per.setdefault(k, []).append(float(row[k]))
    out = {"seeds": len(tables), "rows": []}
    for method, per in values.items():
        row = {"method": method, "n": max(len(v) for v in per.values())}
        for k, v in per.items():
            row[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
        out["rows"].append(row)
    return out


def markdown(agg: dict, title: str) -> str:
    cols = [k for k in METRICS if any(k in r for r in agg["rows"])]
    lines = [title, "", "| method | n | " + " | ".join(cols) + " |", "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in agg["rows"]:
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" if k in r else "" for k in cols]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, paths = argv[0], argv[1:]
    tables = []
    for p in paths:
        with open(p) as f:
            tables.append(json.load(f))
    agg = aggregate(tables)
    title = f"{tables[0].get('title', 'AP50')}; mean ± sample std over {len(tables)} seeds"
    agg["title"] = title
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "replicate.json"), "w") as f:
        json.dump(agg, f, indent=2)
    md = markdown(agg, title)
    try:  # the trade-off of the means (needs matplotlib, installed with the package)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fa_deploy.report.plots import tradeoff_plot

        means = [{"method": r["method"], **{k: r[k]["mean"] for k in ("clean", "advAP") if k in r},
                  **{f"{k}_std": r[k]["std"] for k in ("clean", "advAP") if k in r}} for r in agg["rows"]]
        if all("advAP" in r for r in means):
            tradeoff_plot(means, os.path.join(out, "replicate_tradeoff.png"), label_key="method")
            md += "\n![clean AP50 against advAP, means and standard deviations over seeds](replicate_tradeoff.png)\n"
    except ImportError as e:
        print(f"replicate_table.py: no plot ({e})", file=sys.stderr)
    with open(os.path.join(out, "replicate.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
