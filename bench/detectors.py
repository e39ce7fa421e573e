"""Issue 25's targets for the detectors added to YOLOv3 and Faster R-CNN (RetinaNet, FCOS, SSDlite, Ultralytics YOLOv8),
at a small size on the CPU:

- one PGD step per image (the evaluation attack's step: each image's own loss `loss_terms_per_image`, its input
  gradient and the sign step, `run_attack` with one iteration) within 1.2x of the model's own forward + backward
  (`forward_train` on the batch and the input gradient);
- the fp32 twin's forward + backward within 1.5x of the source's (where a twin exists: RetinaNet, FCOS,
  SSDlite, YOLOv8 (`UltralyticsTwin`), YOLOv3).

    python bench/detectors.py [--img-size 128[,320]] [--batch 8] [--iters 5]
                              [--models retinanet,fcos,ssdlite,yolov8,yolov3]

Random weights (speed does not depend on them), medians of --iters rounds after a warm-up, wall and process CPU
time (the steadier figure on a shared machine). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from twins import _targets, attack_step, export_yolo  # noqa: E402

from fa_train.adversarial.attack_objectives import DetectionLoss  # noqa: E402
from fa_train.adversarial.attacks import Budget, SignStep, run_attack  # noqa: E402
from fa_train.models import create_model  # noqa: E402

SMALL = {
    "retinanet": ("retinanet_resnet50_fpn", dict(backbone="resnet18", fpn_channels=64)),
    "fcos": ("fcos_resnet50_fpn", dict(backbone="resnet18", fpn_channels=64)),
    "ssdlite": ("ssdlite320_mobilenet_v3_large", dict()),  # width 1.0: already a small network (3.4 M)
    "yolov8": ("ultralytics", dict(cfg="yolov8n.yaml")),
    "yolov3": ("yolov3", dict(width_mult=0.25, depth_mult=0.33)),
}
TWINS = ("retinanet", "fcos", "ssdlite", "yolov8", "yolov3")  # a whole-model twin exists


def _time(fn, iters):
    wall, cpu = [], []
    for i in range(iters + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if i:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench(key, size, batch, iters):
    name, kw = SMALL[key]
    if name.startswith("ssdlite"):
        kw = dict(kw, size=size)  # its fixed input side
    elif name != "yolov3" and name != "ultralytics":
        kw = dict(kw, min_size=size, max_size=size)
    torch.manual_seed(0)
    model = create_model(name, 4, **kw).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    t = _targets(batch, size, g)
    rows = {"forward + backward": _time(lambda: attack_step(model, x, t), iters),
            "PGD step (per-image loss)": _time(lambda: run_attack(model, DetectionLoss(per_image=True),
                                                                  SignStep(0.01), Budget(0.03, 1), x, t), iters)}
    if key in TWINS:
        from fa_deploy.robustness.twin import load_twin

        with tempfile.TemporaryDirectory() as d:
            paths = export_yolo(model, d, size, [torch.rand(1, 3, size, size, generator=g) for _ in range(2)])
            twin = load_twin(paths["fp32"], verify_images=torch.rand(2, 3, size, size, generator=g)).eval()
            rows["fp32 twin forward + backward"] = _time(lambda: attack_step(twin, x, t), iters)
    base = rows["forward + backward"]
    out = []
    for k, (w, c) in rows.items():
        target = 1.2 if k.startswith("PGD") else 1.5 if "twin" in k else None
        r = {"detector": key, "row": k, "wall_ms": w * 1000, "cpu_ms": c * 1000, "x_wall": w / base[0],
             "x_cpu": c / base[1], "target": target}
        r["meets"] = None if target is None else r["x_cpu"] <= target
        out.append(r)
        print(f"  {key:<10} {k:<30} {w * 1000:9.1f} ms {r['x_wall']:6.2f}x   CPU {c * 1000:9.1f} ms {r['x_cpu']:6.2f}x"
              + ("" if target is None else f"   target <= {target}x: {'met' if r['meets'] else 'MISSED'}"),
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", default="128", help="one size or several, comma-separated (e.g. 128,320: the "
                    "twins' per-image cost depends on it)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--models", default="retinanet,fcos,ssdlite,yolov8,yolov3")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    rows = []
    for size in (int(v) for v in a.img_size.split(",")):
        print(f"batch {a.batch}, {size} px, {torch.get_num_threads()} threads, median of {a.iters} rounds")
        for key in a.models.split(","):
            try:
                rows += [dict(r, img_size=size) for r in bench(key, size, a.batch, a.iters)]
            except Exception as e:  # e.g. the ultralytics extra not installed, a twin that does not verify
                print(f"  {key}: not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
