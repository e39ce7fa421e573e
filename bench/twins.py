"""Cost of the differentiable twins (fa_deploy/robustness/twin.py) against the source model: one attack step's forward and
backward (`forward_train` on ground truth, then the gradient with respect to the input images), on the CPU.

    python bench/twins.py [--model yolov3|fasterrcnn|both] [--img-size 416] [--frcnn-size 320] [--batch 1] [--iters 5]

Random weights (speed does not depend on them; int8 is calibrated on random images), exported with fa-export's
own functions, each twin verified against ONNX Runtime before it is timed. Each round runs the source and the twins
in a shuffled order; medians of --iters rounds after a warm-up, of wall time and of the process's CPU time (the
steadier figure on a machine shared with other jobs).
Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fa_deploy.exporting import onnx_export as ex  # noqa: E402
from fa_deploy.exporting import two_network as split  # noqa: E402
from fa_deploy.robustness.twin import load_twin  # noqa: E402
from fa_train.models import create_model  # noqa: E402


def _targets(n, size, generator):
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=generator) * size * 0.6
        wh = torch.rand(3, 2, generator=generator) * size * 0.3 + size * 0.05
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([0, 1, 2]),
                    "ignore": torch.zeros(3, dtype=torch.bool)})
    return out


def attack_step(model, images, targets):
    """One PGD step's work: the detection loss and its gradient with respect to the images."""
    x = images.detach().requires_grad_(True)
    losses, _ = model.forward_train(x, targets)
    (g,) = torch.autograd.grad(sum(losses.values()), x)
    return g


def export_yolo(model, d, size, cal):
    fp32 = os.path.join(d, "m.fp32.onnx")
    ex.export_fp32(model, fp32, size, batch=1)
    paths = {"fp32": fp32, "fp16": os.path.join(d, "m.fp16.onnx"), "int8": os.path.join(d, "m.int8.onnx")}
    ex.export_fp16(fp32, paths["fp16"], model.export_keep_float32)
    ex.export_int8(fp32, paths["int8"], cal, model.export_keep_float32)
    for p, path in paths.items():
        ex.write_sidecar(path, {"model": model.arch_config(), "precision": p})
    return paths


def export_frcnn(model, d, size, cal):
    names = split._part_names(model)
    mods = model.part_modules()
    h, w = model.transformed_size(size)
    channels = model.detector.backbone.out_channels
    files = {p: {} for p in ("fp32", "fp16", "int8")}
    dummies = {"backbone": torch.rand(1, 3, h, w), "roi_heads": torch.rand(16, channels, 7, 7)}
    for part in ("backbone", "roi_heads"):
        files["fp32"][part] = os.path.join(d, f"m.fp32.{part}.onnx")
        split._export_part(mods[part], dummies[part], files["fp32"][part], names[part]["input"],
                           names[part]["outputs"], ex.DEFAULT_OPSET)
        files["fp16"][part] = os.path.join(d, f"m.fp16.{part}.onnx")
        ex.export_fp16(files["fp32"][part], files["fp16"][part], ())
    files["int8"]["backbone"] = os.path.join(d, "m.int8.backbone.onnx")
    ex.export_int8(files["fp32"]["backbone"], files["int8"]["backbone"], [split.transformed(model, c) for c in cal], ())
    files["int8"]["roi_heads"] = os.path.join(d, "m.int8.roi_heads.onnx")
    shutil.copyfile(files["fp32"]["roi_heads"], files["int8"]["roi_heads"])
    paths = {}
    for p, parts in files.items():
        paths[p] = os.path.join(d, f"m.{p}.pipeline.json")
        split.write_manifest(paths[p], {"format": "onnx-pipeline", "precision": p, "model": model.arch_config(),
                                        "parts": {k: os.path.basename(v) for k, v in parts.items()}})
    return paths


def bench(name, model, paths, size, batch, iters):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    targets = _targets(batch, size, g)
    rows = {"source fp32 (eager)": model}
    for p, path in paths.items():
        t0 = time.perf_counter()
        twin = load_twin(path, verify_images=torch.rand(2, 3, size, size, generator=g))
        print(f"  {p} twin built and verified in {time.perf_counter() - t0:.1f} s", flush=True)
        rows[f"twin {p}"] = twin
    wall = {k: [] for k in rows}
    cpu = {k: [] for k in rows}
    order = list(rows)
    for i in range(iters + 1):  # the first round is the warm-up
        random.Random(i).shuffle(order)  # no row always runs right after another
        for k in order:
            torch.manual_seed(i)  # Faster R-CNN samples proposals at random: the same draw for every row
            t0, c0 = time.perf_counter(), time.process_time()
            attack_step(rows[k], x, targets)
            if i:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    src = "source fp32 (eager)"
    out = []
    print(f"{name}: forward + input gradient of forward_train, batch {batch}, {size} px, {torch.get_num_threads()} "
          f"threads, median of {iters} rounds")
    # on a shared machine other jobs stretch wall time; the process's CPU time (all its threads) is the steadier cost
    print(f"  {'model':<22} {'wall ms':>9} {'x source':>9} {'CPU ms':>9} {'x source':>9}")
    for k in rows:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        xw, xc = w / statistics.median(wall[src]), c / statistics.median(cpu[src])
        print(f"  {k:<22} {w * 1000:9.1f} {xw:9.2f} {c * 1000:9.1f} {xc:9.2f}")
        out.append({"model": name, "row": k, "wall_ms": w * 1000, "x_source_wall": xw, "cpu_ms": c * 1000,
                    "x_source_cpu": xc})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("yolov3", "fasterrcnn", "both"), default="both")
    ap.add_argument("--img-size", type=int, default=416, help="YOLOv3 input size")
    ap.add_argument("--width", type=float, default=1.0, help="YOLOv3 width multiplier")
    ap.add_argument("--depth", type=float, default=1.0, help="YOLOv3 depth multiplier (the demo: --width 0.25 "
                    "--depth 0.33 --img-size 128 --batch 16)")
    ap.add_argument("--frcnn-size", type=int, default=320, help="Faster R-CNN min_size = max_size = input size")
    ap.add_argument("--frcnn-backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = tempfile.mkdtemp(prefix="fa-bench-twins-")
    rows = []
    try:
        if args.model in ("yolov3", "both"):
            s = args.img_size
            model = create_model("yolov3", 80, width_mult=args.width, depth_mult=args.depth).eval()
            cal = [np.random.default_rng(i).random((1, 3, s, s), dtype=np.float32) for i in range(4)]
            rows += bench(f"YOLOv3 (width {args.width}, depth {args.depth}, 80 classes)", model, export_yolo(model, d, s, cal), s,
                          args.batch, args.iters)
        if args.model in ("fasterrcnn", "both"):
            s = args.frcnn_size
            model = create_model("fasterrcnn_resnet50_fpn", 20, backbone=args.frcnn_backbone, min_size=s,
                                 max_size=s).eval()
            cal = [np.random.default_rng(i).random((1, 3, s, s), dtype=np.float32) for i in range(4)]
            rows += bench(f"Faster R-CNN FPN ({args.frcnn_backbone}, 20 classes)", model,
                          export_frcnn(model, d, s, cal), s, args.batch, args.iters)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
