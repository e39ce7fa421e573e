"""Cost of each attack of `fa-bench --attack` and of the suite, per image and as a multiple of one forward/backward
pass (each image's own ground-truth loss and its input gradient) of the same model and batch, in one run.

    python bench/attacks.py [--arch yolov3|frcnn] [--batch 16] [--img-size 128] [--repeats 3] [--restarts 1]

Target: every attack within 10 % of its pass count (the paper's PGD rows: 1 + 3 + 5 + 10 = 19, of which 3 are the
same gradient at the clean images, computed once, so they cost 16; APGD and cwa:
iterations x restarts = 20; each TOG attack: 10; the suite: their sum, 96). The extra forwards (APGD's last
iterate, TOG's clean detections, the worst case's ground-truth losses) are inside that 10 %. Medians of
`--repeats` rounds of each attack's time over a pass timed right before it (a load change between attacks
stays out of the ratios).
Random weights: speed does not depend on them (TOG's clean detections are taken at score 0 so they exist).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa_train.adversarial.attack_objectives import DetectionLoss  # noqa: E402
from fa_train.adversarial.attacks import _value_and_grad, frozen_batchnorm  # noqa: E402
from fa_train.adversarial.suite import SUITE, AttackSettings, ColumnRunner, attack_plan, candidates, shared_start  # noqa: E402
from fa_train.models import create_model  # noqa: E402


def _model(arch: str, img: int):
    torch.manual_seed(0)
    if arch == "yolov3":  # the demo's model (configs/demo.yaml)
        return create_model("yolov3", 4, width_mult=0.25, depth_mult=0.33)
    return create_model("fasterrcnn_resnet50_fpn", 4, backbone="resnet18", fpn_channels=64, min_size=img,
                        max_size=img)


def _targets(n: int, img: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * img * 0.6
        wh = torch.rand(3, 2, generator=g) * img * 0.3 + 8
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([0, 1, 2]),
                    "ignore": torch.zeros(3, dtype=torch.bool)})
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["yolov3", "frcnn"], default="yolov3")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args.arch, args.img_size).eval()
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(2))
    t = _targets(args.batch, args.img_size)
    keys = list(range(args.batch))
    settings = AttackSettings(0.03, (1, 3, 5, 10), 20, args.restarts, tog_score=0.0)
    plan = attack_plan(model, SUITE, settings)
    groups = {}  # attack -> its columns (the paper's rows are one attack of 19 passes)
    for c in plan:
        groups.setdefault(c.attack, []).append(c)
    # gradient evaluations: each column's iterations x restarts, less the clean gradient shared within a group
    target = {a: sum(c.budget.iterations * c.budget.restarts for c in cols)
              - max(0, sum(shared_start(c) is not None for c in cols) - 1) for a, cols in groups.items()}
    target["suite"] = sum(target.values())
    obj = DetectionLoss()

    def one_pass():
        with frozen_batchnorm(model):
            _value_and_grad(obj, model, x, t)

    def attack(cols):
        def run():  # as fa-bench runs them: the paper's rows share their first gradient (16 passes, not 19)
            runner = ColumnRunner(model, x, t, keys)
            for c in cols:
                runner.run(c)
        return run

    def suite():
        for _ in candidates(model, x, t, plan, image_keys=keys, need_losses=True):
            pass

    jobs = {**{a: attack(cols) for a, cols in groups.items()}, "suite": suite}
    for _ in range(2):  # warm-up
        one_pass()
    # each attack's time over the pass time measured right before it (median of 3 passes), so a change of load
    # or clock between one attack and the next does not enter the ratio; medians over --repeats rounds
    ratios, times, passes = {k: [] for k in jobs}, {k: [] for k in jobs}, []
    for _ in range(args.repeats):
        for k, fn in jobs.items():
            unit_now = statistics.median(_time(one_pass) for _ in range(3))
            passes.append(unit_now)
            t_k = _time(fn)
            times[k].append(t_k)
            ratios[k].append(t_k / unit_now)
    unit = statistics.median(passes)
    print(f"{args.arch}, batch {args.batch}, {args.img_size} px, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}; one forward/backward pass: {1000 * unit:.1f} ms "
          f"({1000 * unit / args.batch:.2f} ms/img)\n")
    print("| attack | target passes | measured (x one pass) | ms/img | over target |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for k in jobs:
        ratio = statistics.median(ratios[k])
        over = ratio / target[k] - 1
        worst = max(worst, over)
        print(f"| {k} | {target[k]} | {ratio:.1f} | {1000 * statistics.median(times[k]) / args.batch:.1f} | "
              f"{100 * over:+.1f} % |")
    print(f"\nlargest excess over the pass count: {100 * worst:+.1f} % (target: within 10 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
