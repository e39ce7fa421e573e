"""The reproduction scripts: the paper grid (dry run), the paper-table filler, the seed aggregation (against
numpy) and a miniature of the small-scale replication, end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _bench_json(path, rows):
    cols = ["model", "method", "clean", "PGD-1", "advAP", "acAP"]
    with open(path, "w") as f:
        json.dump({"title": "AP50 on test", "columns": cols, "rows": rows}, f)


def _row(method, clean, adv):
    return {"model": method, "method": method, "clean": clean, "PGD-1": adv, "advAP": adv, "acAP": (clean + adv) / 2}


def test_reproduce_paper_grid_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", NPROC="8", BIN=BIN)
    r = subprocess.run(["bash", "scripts/reproduce_paper.sh", "/voc", "/coco", "/d53.conv.74", "/r50.pth",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [l[2:] for l in r.stdout.splitlines() if l.startswith("+ ")]
    train = [c for c in cmds if "fa_train.cli" in c]
    bench = [c for c in cmds if "fa_deploy.cli" in c]
    # Table 1: 2 detectors x (base + 5 methods x 3 PGD settings); Table 2: base + 5 methods
    assert len(train) == 2 * (1 + 15) + 6 and len(bench) == 2 * 3 + 1
    assert all("--nproc_per_node 8" in c and "--sync-bn" in c for c in train)
    assert any("--method fa --pgd-steps 2 --train-eps 0.02" in c and "voc_yolov3_fa_pgd2" in c for c in train)
    assert any("--weights-backbone /r50.pth" in c and "paper_voc_frcnn.yaml" in c for c in train)
    assert any("coco:/coco" in c and "--method kdfa --pgd-steps 1 --train-eps 0.01" in c for c in train)
    assert cmds[-1].endswith(f"scripts/paper_tables.py {tmp_path}")
    env["EPS_MODE"] = "text"
    r = subprocess.run(["bash", "scripts/reproduce_paper.sh", "/voc", "/coco", "/d", "/r", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert "--pgd-steps 3 --train-eps 0.01" in r.stdout and "--train-eps 0.03" not in r.stdout


def test_paper_tables_put_ours_beside_the_papers(tmp_path):
    _bench_json(tmp_path / "table1_yolov3_pgd1.json", [_row("standard", 0.8, 0.05), _row("fa", 0.75, 0.25)])
    _bench_json(tmp_path / "table2.json", [_row("at", 0.5, 0.1)])
    r = subprocess.run([sys.executable, "scripts/paper_tables.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "tables.md").read_text()
    assert "| FA | 0.745 / 0.217 / 0.481 | 0.750 / 0.250 / 0.500 | 0.712 / 0.241 / 0.477 | - |" in md
    assert "| AT | 0.490 / 0.089 / 0.290 | 0.500 / 0.100 / 0.300 |" in md
    t = json.loads((tmp_path / "tables.json").read_text())
    assert t["table1"]["fasterrcnn"]["3"]["fa"]["paper"] == [0.825, 0.26, 0.543]


def test_replicate_table_mean_and_spread_against_numpy(tmp_path):
    vals = {"at": [(0.70, 0.10), (0.66, 0.12), (0.69, 0.08)], "fa": [(0.71, 0.11), (0.70, 0.13), (0.66, 0.10)]}
    paths = []
    for s in range(3):
        p = tmp_path / f"s{s}.json"
        _bench_json(p, [_row(m, *v[s]) for m, v in vals.items()])
        paths.append(str(p))
    r = subprocess.run([sys.executable, "scripts/replicate_table.py", str(tmp_path / "out"), *paths], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    agg = json.loads((tmp_path / "out" / "replicate.json").read_text())
    for row in agg["rows"]:
        clean = np.array([v[0] for v in vals[row["method"]]])
        assert row["n"] == 3
        assert row["clean"]["mean"] == pytest.approx(clean.mean())
        assert row["clean"]["std"] == pytest.approx(clean.std(ddof=1))
    md = (tmp_path / "out" / "replicate.md").read_text()
    assert f"| fa | 3 | {np.mean([0.71, 0.70, 0.66]):.4f} ± {np.std([0.71, 0.70, 0.66], ddof=1):.4f} |" in md
    assert (tmp_path / "out" / "replicate_tradeoff.png").is_file()


def test_replicate_small_miniature_end_to_end(tmp_path):
    env = dict(os.environ, BIN=BIN, SEEDS="1 2", METHODS="standard fa", BASE_EPOCHS="1", EPOCHS="1",
               EXTRA="--data synth:60 --img-size 64 --width-mult 0.125 --depth-mult 0.2 --max-images 8 "
                     "--max-test-images 4 --workers 0 --batch-size 4",
               BENCH_EXTRA="--steps 1 --max-images 4 --workers 0", OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", "scripts/replicate_small.sh", str(tmp_path / "rep")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    agg = json.loads((tmp_path / "rep" / "replicate.json").read_text())
    assert sorted(row["method"] for row in agg["rows"]) == ["fa", "standard"]
    assert all(row["n"] == 2 for row in agg["rows"])
    for s in (1, 2):
        assert (tmp_path / "rep" / f"seed{s}" / "fa" / "last.pt").is_file()
    # a second run finds every stage done and only rebuilds the table
    r2 = subprocess.run(["bash", "scripts/replicate_small.sh", str(tmp_path / "rep")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "training yolov3" not in r2.stdout
