"""Fill the paper's Tables 1 and 2 with our numbers, beside the paper's: reads the fa-bench JSON files that
scripts/reproduce_paper.sh writes (OUT/table1_<detector>_pgd<k>.json, OUT/table2.json) and writes OUT/tables.md
and OUT/tables.json. Missing runs are left as "-".

    python scripts/paper_tables.py OUT
"""
from __future__ import annotations

import json
import os
import sys

METHODS = ("standard", "at", "tod", "kdfa", "ssfa", "fa")
NAMES = {"standard": "standard", "at": "AT", "tod": "TOD", "kdfa": "KDFA", "ssfa": "SSFA", "fa": "FA"}
# The paper's numbers (clean AP50, advAP, acAP): Table 1 (PASCAL VOC 2007 test, trained with PGD-1/2/3) and
# Table 2 (MS-COCO minival 2014, YOLOv3 trained with PGD-1).
PAPER = {
    "table1": {
        "fasterrcnn": {
            1: {"at": (0.834, 0.074, 0.454), "tod": (0.833, 0.106, 0.470), "kdfa": (0.833, 0.133, 0.483),
                "ssfa": (0.833, 0.123, 0.478), "fa": (0.834, 0.166, 0.500)},
            2: {"at": (0.824, 0.236, 0.530), "tod": (0.828, 0.247, 0.538), "kdfa": (0.828, 0.273, 0.551),
                "ssfa": (0.829, 0.267, 0.548), "fa": (0.832, 0.286, 0.559)},
            3: {"at": (0.822, 0.137, 0.480), "tod": (0.821, 0.173, 0.497), "kdfa": (0.823, 0.217, 0.520),
                "ssfa": (0.824, 0.190, 0.507), "fa": (0.825, 0.260, 0.543)},
        },
        "yolov3": {
            1: {"at": (0.724, 0.201, 0.463), "tod": (0.702, 0.208, 0.455), "kdfa": (0.739, 0.217, 0.478),
                "ssfa": (0.730, 0.189, 0.460), "fa": (0.745, 0.217, 0.481)},
            2: {"at": (0.665, 0.217, 0.441), "tod": (0.659, 0.228, 0.444), "kdfa": (0.702, 0.240, 0.471),
                "ssfa": (0.693, 0.221, 0.457), "fa": (0.712, 0.241, 0.477)},
            3: {"at": (0.604, 0.201, 0.403), "tod": (0.581, 0.206, 0.394), "kdfa": (0.672, 0.240, 0.456),
                "ssfa": (0.653, 0.223, 0.438), "fa": (0.677, 0.241, 0.459)},
        },
    },
    "table2": {"standard": (0.545, 0.065, 0.305), "at": (0.49, 0.089, 0.290), "tod": (0.488, 0.088, 0.288),
               "kdfa": (0.506, 0.110, 0.308), "ssfa": (0.499, 0.103, 0.301), "fa": (0.510, 0.120, 0.315)},
}


def _ours(path: str) -> dict:
    """method -> (clean, advAP, acAP) from one fa-bench JSON file ({} when the run is missing)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {r["method"]: (r["clean"], r["advAP"], r["acAP"]) for r in rows}


def _cell(v):
    return "-" if v is None else f"{v:.3f}"


def build(out: str) -> dict:
    tables = {"table1": {}, "table2": {}}
    for det, by_k in PAPER["table1"].items():
        tables["table1"][det] = {}
        for k, paper in by_k.items():
            ours = _ours(os.path.join(out, f"table1_{det}_pgd{k}.json"))
            tables["table1"][det][k] = {m: {"paper": paper.get(m), "ours": ours.get(m)} for m in METHODS
                                        if m in paper or m in ours}
    ours = _ours(os.path.join(out, "table2.json"))
    tables["table2"] = {m: {"paper": PAPER["table2"].get(m), "ours": ours.get(m)} for m in METHODS}
    return tables


def markdown(tables: dict) -> str:
    lines = ["# The paper's Tables 1 and 2, and ours", "",
             "Each cell: clean AP50 / advAP / acAP (AP50 at IoU 0.5; advAP = mean AP50 under PGD-1/3/5/10 at eps "
             "0.03; acAP = mean of the two). `-`: not run.", ""]
    for det, by_k in tables["table1"].items():
        lines += [f"## Table 1, {det} on PASCAL VOC 2007 test", "",
                  "| method | " + " | ".join(f"PGD-{k} paper | PGD-{k} ours" for k in by_k) + " |",
                  "| --- | " + " | ".join("--- | ---" for _ in by_k) + " |"]
        methods = [m for m in METHODS if any(m in by_k[k] for k in by_k)]
        for m in methods:
            cells = []
            for k in by_k:
                e = by_k[k].get(m, {})
                for src in ("paper", "ours"):
                    v = e.get(src)
                    cells.append(" / ".join(_cell(x) for x in v) if v else "-")
            lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Table 2, YOLOv3 on MS-COCO minival 2014 (trained with PGD-1)", "", "| method | paper | ours |",
              "| --- | --- | --- |"]
    for m, e in tables["table2"].items():
        cells = [" / ".join(_cell(x) for x in e[src]) if e[src] else "-" for src in ("paper", "ours")]
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    tables = build(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tables.json"), "w") as f:
        json.dump(tables, f, indent=2)
    md = markdown(tables)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
