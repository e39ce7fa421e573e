"""Checks against false robustness (Carlini et al. 2019, "On Evaluating Adversarial Robustness", section 5): AP50
under APGD as the attack budget grows must behave as it does for a model whose gradients can be followed.

| check | violated when | sign of |
| --- | --- | --- |
| AP50 non-increasing with steps | AP50(k+) > AP50(k) + tol for successive iteration counts | the attack does not converge: noisy, stochastic or shattered gradients |
| AP50 non-increasing with eps | AP50(eps+) > AP50(eps) + tol | gradients that stop leading the attack as the ball grows (masking) |
| AP50 about zero at the largest eps | AP50(max eps) > zero_fraction x clean AP50 | gradient masking (or an eps too small to be "large" for this data) |
| restarts never raise the worst case | AP50 with R random starts > AP50 with one + tol | a loss the attack climbs that AP does not follow, or randomness in the model |
| transfer does not beat white-box | AP50 under APGD images made on another checkpoint < white-box AP50 - tol | the model's own gradients are masked: a surrogate's lead further |

Every point is APGD on each image's own ground-truth detection loss (`attacks.apgd_attack`): the eps curve at
`iterations` iterations, the steps curve at `eps`; random starts are seeded per image and nested (restart r is
the same draw whatever the number of restarts), so more restarts can only raise each image's best loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

SANITY_EPS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
SANITY_STEPS = (1, 2, 5, 10, 20, 50)
TOLERANCE = 0.01  # AP50 points an estimate may move by without counting as a violation
ZERO_FRACTION = 0.1  # "about zero": at most this fraction of the clean AP50


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    sign_of: str

    def as_row(self) -> Dict[str, str]:
        return {"check": self.name, "result": "PASS" if self.passed else "FAIL", "detail": self.detail,
                "violation is a sign of": self.sign_of}


def _configs(eps: float, iterations: int, restarts: int, eps_grid, steps_grid, transfer: bool):
    """(attack eps, iterations, restarts, gradient source) of every curve point, deduplicated."""
    cfgs = [(e, iterations, 1, "self") for e in eps_grid]
    cfgs += [(eps, k, 1, "self") for k in steps_grid]
    cfgs += [(eps, iterations, r, "self") for r in sorted({1, restarts})]
    if transfer:
        cfgs.append((eps, iterations, 1, "transfer"))
    return list(dict.fromkeys(cfgs))


def sanity_curves(model, loader, device, eps: float = 0.03, iterations: int = 20, restarts: int = 3,
                  eps_grid: Sequence[float] = SANITY_EPS, steps_grid: Sequence[int] = SANITY_STEPS,
                  transfer_model=None, seed: int = 0, progress: bool = True) -> Dict:
    """Clean AP50 and AP50 under APGD at every point of the curves (one pass over the data; each batch's
    adversarial images are evaluated before the next)."""
    from tqdm import tqdm

    from ..evaluation import coco_evaluate, coco_ground_truth, detections_to_coco
    from .attacks import apgd_attack

    cfgs = _configs(eps, iterations, restarts, eps_grid, steps_grid, transfer_model is not None)
    dataset = loader.dataset
    model.eval()
    if transfer_model is not None:
        transfer_model.eval()
    results = {c: [] for c in cfgs}
    clean = []
    t0 = time.time()
    for images, targets, metas in tqdm(loader, desc="sanity", leave=False, disable=None if progress else True,
                                       unit="batch"):
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        keys = [m["image_id"] for m in metas]
        with torch.inference_mode():
            clean += detections_to_coco(model.predict(images), metas, dataset.label_to_cat_id)
        for c in cfgs:
            e, k, r, src = c
            attacker = model if src == "self" else transfer_model
            adv = apgd_attack(attacker, images, targets, e, iterations=k, restarts=r, seed=seed,
                              image_keys=keys).images
            with torch.inference_mode():
                results[c] += detections_to_coco(model.predict(adv), metas, dataset.label_to_cat_id)
    gt = coco_ground_truth(dataset)
    ap = {c: coco_evaluate(gt, r, dataset.class_names)["AP50"] for c, r in results.items()}
    return {"clean": coco_evaluate(gt, clean, dataset.class_names)["AP50"],
            "eps_curve": [(e, ap[(e, iterations, 1, "self")]) for e in eps_grid],
            "steps_curve": [(k, ap[(eps, k, 1, "self")]) for k in steps_grid],
            "restarts": [(r, ap[(eps, iterations, r, "self")]) for r in sorted({1, restarts})],
            "transfer": ap.get((eps, iterations, 1, "transfer")), "white_box": ap[(eps, iterations, 1, "self")],
            "eps": eps, "iterations": iterations, "seconds": time.time() - t0}


def _monotone(curve, what: str, tol: float) -> tuple:
    bad = [f"{what} {b[0]:g}: {b[1]:.4f} > {what} {a[0]:g}: {a[1]:.4f}" for a, b in zip(curve, curve[1:])
           if b[1] > a[1] + tol]
    return not bad, "; ".join(bad) or " ".join(f"{p[1]:.4f}" for p in curve)


def sanity_verdicts(curves: Dict, tol: float = TOLERANCE, zero_fraction: float = ZERO_FRACTION) -> List[Check]:
    checks = []
    ok, detail = _monotone(curves["steps_curve"], "steps", tol)
    checks.append(Check("AP50 non-increasing with steps", ok, detail,
                        "an attack that does not converge: noisy, stochastic or shattered gradients"))
    ok, detail = _monotone(curves["eps_curve"], "eps", tol)
    checks.append(Check("AP50 non-increasing with eps", ok, detail,
                        "gradients that stop leading the attack as the ball grows (gradient masking)"))
    e_max, ap_max = max(curves["eps_curve"])
    limit = zero_fraction * curves["clean"]
    checks.append(Check(f"AP50 about zero at eps {e_max:g}", ap_max <= limit + 1e-12,
                        f"{ap_max:.4f} {'<=' if ap_max <= limit + 1e-12 else '>'} {zero_fraction:g} x clean "
                        f"{curves['clean']:.4f}",
                        "gradient masking: even a large budget does not find the way (or eps is not large here)"))
    (r1, ap1), (rn, apn) = curves["restarts"][0], curves["restarts"][-1]
    if rn > r1:
        checks.append(Check("restarts never raise the worst case", apn <= ap1 + tol,
                            f"{rn} restarts {apn:.4f}, {r1} restart {ap1:.4f}",
                            "a loss the attack climbs that AP does not follow, or randomness in the model"))
    if curves.get("transfer") is not None:
        tr, wb = curves["transfer"], curves["white_box"]
        checks.append(Check("transfer does not beat white-box", tr >= wb - tol,
                            f"transfer {tr:.4f}, white-box {wb:.4f}",
                            "masked gradients: another model's gradients attack this one better than its own"))
    return checks


def curve_rows(name: str, curves: Dict) -> Dict[str, float]:
    """One table row: clean AP50 and every curve point (eps=..., steps=...)."""
    row = {"model": name, "clean": curves["clean"]}
    row.update({f"eps {e:g}": ap for e, ap in curves["eps_curve"]})
    row.update({f"steps {k}": ap for k, ap in curves["steps_curve"]})
    row.update({f"restarts {r}": ap for r, ap in curves["restarts"]})
    if curves.get("transfer") is not None:
        row["transfer"] = curves["transfer"]
    return row


def run_checks(model, loader, device, transfer_model: Optional[torch.nn.Module] = None, **kw) -> Dict:
    curves = sanity_curves(model, loader, device, transfer_model=transfer_model, **kw)
    return {"curves": curves, "checks": sanity_verdicts(curves)}
