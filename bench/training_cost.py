"""Time per training step of each method against standard training, on the same model and batch.

    python bench/training_cost.py [--width 0.25 --depth 0.33 --img-size 128 --batch 16 --pgd-steps 1]

The bound for PGD-k methods is (k+1) standard steps (gradient reuse: the clean forward/backward is the first
attack iteration) plus, for KDFA/FA, one no-grad teacher forward of the backbone. TOD adds per-image candidate
scoring on top (forward passes without gradient). Not a test: the README records the figures.

Issue 22's training attacks (rows after the methods; `--robust` on by default, `--no-robust` to skip):
- `pgdK-rs`: AT with PGD-k at eps 0.03 from a random start, alpha 0 (no clean pass is needed: no clean loss, no
  first gradient to reuse), against its (k+1)-pass bound; `pgdK-rs-a`: the same with alpha 0.5, whose clean pass
  cannot feed the attack (the attack starts elsewhere): a (k+2)-pass bound.
- `free-M`: one replay of Free AT (alpha 0: one forward/backward serving the parameters and the perturbation).
  Free AT replays each batch M times over epochs / M passes, so its cost per epoch-equivalent is one replay against
  one standard step: the target is within 10 % of standard training.
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
    ap.add_argument("--robust-k", default="3", help="PGD-k of the random-start rows (comma-separated)")
    ap.add_argument("--free-replays", type=int, default=4, help="Free AT's m")
    ap.add_argument("--robust", action=argparse.BooleanOptionalAction, default=True,
                    help="also time issue 22's training attacks")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    images, targets = batch(args.batch, args.img_size, g)
    base = create_model("yolov3", 4, width_mult=args.width, depth_mult=args.depth).train()
    dev = torch.device("cpu")
    times = {}
    rows = [(m, {"name": m, "pgd_steps": args.pgd_steps}) for m in ("standard", "at", "tod", "ssfa", "kdfa", "fa")]
    bounds = {}  # row -> its bound in standard steps (teacher forward added below for kdfa / fa)
    if args.robust:
        for k in (int(x) for x in args.robust_k.split(",") if x.strip()):
            rs = {"name": "at", "pgd_steps": k, "train_eps": 0.03, "step_size": 2.5 * 0.03 / k, "random_start": True}
            rows.append((f"pgd{k}-rs", dict(rs, alpha=0.0)))
            bounds[f"pgd{k}-rs"] = k + 1
            rows.append((f"pgd{k}-rs-a", dict(rs, alpha=0.5)))
            bounds[f"pgd{k}-rs-a"] = k + 2
        m = args.free_replays
        rows.append((f"free-{m}", {"name": "at", "free_replays": m, "train_eps": 0.03, "step_size": 0.03,
                                   "alpha": 0.0}))
        bounds[f"free-{m}"] = 1
    for row, opts in rows:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        cfg = {"method": {"pgd_steps": args.pgd_steps, "train_eps": 0.01, "step_size": 0.01, "alpha": 0.5,
                          "ssfa_weight": None, "kdfa_weight": None, "teacher": None, **opts}, "train": {"seed": 0}}
        obj = build_objective(cfg, model, dev, log=lambda m: None)
        counter = {"n": 0}

        def step():
            from fa_train.adversarial.objectives import StepInfo

            opt.zero_grad(set_to_none=True)
            counter["n"] += 1  # Free AT carries its perturbation from one timed replay to the next, as in training
            obj.step(model, images, targets, _NoScaler(), False, info=StepInfo(step=counter["n"], batch=counter["n"]))
            opt.step()

        times[row] = median_time(step, args.repeat)
    teacher = copy.deepcopy(base).eval()

    def teacher_fwd():
        with torch.no_grad():
            teacher.features(images)

    t_teacher = median_time(teacher_fwd, args.repeat)
    k = args.pgd_steps
    std = times["standard"]
    print(f"YOLOv3 width {args.width} depth {args.depth}, {args.img_size} px, batch {args.batch}, PGD-{k}, "
          f"{torch.get_num_threads()} threads; teacher forward {1000 * t_teacher:.0f} ms")
    print(f"{'method':<11} {'ms/step':>8} {'x standard':>11} {'bound x':>8} {'of bound':>9}")
    for m, t in times.items():
        bound = std if m == "standard" else (bounds.get(m, k + 1)) * std + (t_teacher if m in ("kdfa", "fa") else 0.0)
        print(f"{m:<11} {1000 * t:8.0f} {t / std:10.2f}x {bound / std:7.2f}x {100 * t / bound:8.0f}%")
    if args.robust:
        print(f"free-{args.free_replays}: ms per replay; an epoch replays each batch {args.free_replays} times over "
              f"epochs / {args.free_replays} passes, so per epoch-equivalent it is one replay against one standard step")


if __name__ == "__main__":
    main()
