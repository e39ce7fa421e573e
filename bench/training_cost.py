"""Time per training step of each method against standard training, on the same model and batch.

    python bench/training_cost.py [--width 0.25 --depth 0.33 --img-size 128 --batch 16 --pgd-steps 1]

The bound for PGD-k methods is (k+1) standard steps (gradient reuse: the clean forward/backward is the first
attack iteration) plus, for KDFA/FA, one no-grad teacher forward of the backbone. TOD adds per-image candidate
scoring on top (forward passes without gradient). Not a test: the README records the figures.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fa_train.adversarial.objectives import build_objective  # noqa: E402
from fa_train.models import create_model  # noqa: E402


class _NoScaler:
    def scale(self, t):
        return t


def batch(n, size, g):
    images = torch.rand(n, 3, size, size, generator=g)
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 4, (3,), generator=g),
                        "ignore": torch.zeros(3, dtype=torch.bool)})
    return images, targets


def median_time(fn, repeat):
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--depth", type=float, default=0.33)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pgd-steps", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    images, targets = batch(args.batch, args.img_size, g)
    base = create_model("yolov3", 4, width_mult=args.width, depth_mult=args.depth).train()
    dev = torch.device("cpu")
    times = {}
    for method in ("standard", "at", "tod", "ssfa", "kdfa", "fa"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        cfg = {"method": {"name": method, "pgd_steps": args.pgd_steps, "train_eps": 0.01, "step_size": 0.01,
                          "alpha": 0.5, "ssfa_weight": None, "kdfa_weight": None, "teacher": None}}
        obj = build_objective(cfg, model, dev, log=lambda m: None)

        def step():
            opt.zero_grad(set_to_none=True)
            obj.step(model, images, targets, _NoScaler(), False)
            opt.step()

        times[method] = median_time(step, args.repeat)
    teacher = copy.deepcopy(base).eval()

    def teacher_fwd():
        with torch.no_grad():
            teacher.features(images)

    t_teacher = median_time(teacher_fwd, args.repeat)
    k = args.pgd_steps
    std = times["standard"]
    print(f"YOLOv3 width {args.width} depth {args.depth}, {args.img_size} px, batch {args.batch}, PGD-{k}, "
          f"{torch.get_num_threads()} threads; teacher forward {1000 * t_teacher:.0f} ms")
    print(f"{'method':<9} {'ms/step':>8} {'x standard':>11} {'bound x':>8} {'of bound':>9}")
    for m, t in times.items():
        bound = std if m == "standard" else (k + 1) * std + (t_teacher if m in ("kdfa", "fa") else 0.0)
        print(f"{m:<9} {1000 * t:8.0f} {t / std:10.2f}x {bound / std:7.2f}x {100 * t / bound:8.0f}%")


if __name__ == "__main__":
    main()
