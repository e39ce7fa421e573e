"""Checks against false robustness (Carlini et al. 2019, "On Evaluating Adversarial Robustness", section 5): AP50
under APGD as the attack budget grows must behave as it does for a model whose gradients can be followed.

| check | violated when | sign of |
| --- | --- | --- |
| AP50 non-increasing with steps | AP50(k+) > AP50(k) + tol for successive iteration counts | the attack does not converge: noisy, stochastic or shattered gradients |
| AP50 non-increasing with eps | AP50(eps+) > AP50(eps) + tol | gradients that stop leading the attack as the ball grows (masking) |
| AP50 about zero at the largest eps | AP50(max eps) > zero_fraction x clean AP50 | gradient masking (or an eps too small to be "large" for this data) |
| restarts never raise the worst case | AP50 with R random starts > AP50 with one + tol | a loss the attack climbs that AP does not follow, or randomness in the model |
| restarts do not help much | AP50 with R random starts < AP50 with one - RESTART_GAIN x tol | a rugged or masked landscape: where a start lands decides the result |
| transfer does not beat white-box | AP50 under APGD images made on another checkpoint < white-box AP50 - tol | the model's own gradients are masked: a surrogate's lead further |
| uniform noise not stronger than the attack | AP50 under uniform noise at eps < white-box AP50 - tol | an attack that does worse than chance: its gradients do not lead, or it is broken |
| gradient-free search not stronger than white-box | AP50 under a random search on the loss at eps < white-box AP50 - tol | masked gradients: the loss's values alone lead further than its gradients |

Every point is APGD on each image's own ground-truth detection loss (`attacks.apgd_attack`): the eps curve at
`iterations` iterations, the steps curve at `eps`; random starts are seeded per image and nested (restart r is
the same draw whatever the number of restarts), so more restarts can only raise each image's best loss. The
white-box AP50 the other checks compare with is APGD at `eps`, `iterations`, one start. Uniform noise
(`attacks.uniform_noise`) and the gradient-free random search (`attacks.square_attack`, `queries` loss evaluations
per image, no gradient) are seeded per image too: neither depends on the batch.

tol is `tolerance(n_images)` (below): it grows on few images, where one image moves AP50 a lot.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..data.transforms import content_mask

SANITY_EPS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
SANITY_STEPS = (1, 2, 5, 10, 20, 50)
SANITY_QUERIES = 100  # the random search's loss evaluations per image (forward passes, no backward)
TOLERANCE = 0.01  # the least AP50 an estimate may move by without counting as a violation (many images)
TOLERANCE_IMAGES = 1.0  # ... and on n images, TOLERANCE_IMAGES / n: one image's worth of AP50
RESTART_GAIN = 3.0  # restarts that lower AP50 by more than this many tolerances "help a lot"
ZERO_FRACTION = 0.1  # "about zero": at most this fraction of the clean AP50


def tolerance(n_images: Optional[int]) -> float:
    """How far two AP50 estimates on the same `n_images` images may differ without counting as a violation:
    max(TOLERANCE, TOLERANCE_IMAGES / n_images), TOLERANCE when n is unknown.

    Why 1/n: the smallest change an attack's randomness (another start, a last-bit difference) makes is one image's
    detections changing. That image holds about 1/n of each of its classes' objects when objects spread evenly, so
    every precision-recall curve it touches moves by about 1/n in recall, and AP50 (their area, averaged over the
    classes) by up to about 1/n. A difference below that is explained by one image and is no evidence; on 2 images
    the tolerance is 0.5, on 16 it is 0.0625, from 100 images on the fixed floor 0.01 governs. A bootstrap over
    images would give a bound per pair of points, but at the cost of one COCO evaluation per resample and point,
    and its own estimate is least reliable on the few images where the tolerance matters most."""
    if not n_images:
        return TOLERANCE
    return max(TOLERANCE, TOLERANCE_IMAGES / n_images)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    sign_of: str

    def as_row(self) -> Dict[str, str]:
        return {"check": self.name, "result": "PASS" if self.passed else "FAIL", "detail": self.detail,
                "violation is a sign of": self.sign_of}


def _configs(eps: float, iterations: int, restarts: int, eps_grid, steps_grid, transfer: bool, queries: int):
    """(attack eps, iterations or queries, restarts, source) of every curve point, deduplicated. Source: "self"
    (APGD on the model), "transfer" (APGD on the transfer model), "noise" (uniform noise), "search" (the
    gradient-free random search, `queries` loss evaluations)."""
    cfgs = [(e, iterations, 1, "self") for e in eps_grid]
    cfgs += [(eps, k, 1, "self") for k in steps_grid]
    cfgs += [(eps, iterations, r, "self") for r in sorted({1, restarts})]
    if transfer:
        cfgs.append((eps, iterations, 1, "transfer"))
    cfgs += [(eps, 0, 1, "noise"), (eps, queries, 1, "search")]
    return list(dict.fromkeys(cfgs))


def _adversarial(c, model, transfer_model, images, targets, keys, seed: int, mask=None) -> torch.Tensor:
    """One curve point's images; `mask`: the pixels they may change (the letterbox padding stays clean, as in
    fa-bench's attacks)."""
    from .attacks import apgd_attack, square_attack, uniform_noise

    e, k, r, src = c
    if src == "noise":
        noisy = uniform_noise(images, e, seed=seed, image_keys=keys)
        return noisy if mask is None else torch.where(mask, noisy, images)
    if src == "search":
        return square_attack(model, images, targets, e, queries=k, seed=seed, image_keys=keys, mask=mask).images
    attacker = model if src == "self" else transfer_model
    return apgd_attack(attacker, images, targets, e, iterations=k, restarts=r, seed=seed, image_keys=keys,
                       mask=mask).images


def sanity_curves(model, loader, device, eps: float = 0.03, iterations: int = 20, restarts: int = 3,
                  eps_grid: Sequence[float] = SANITY_EPS, steps_grid: Sequence[int] = SANITY_STEPS,
                  transfer_model=None, seed: int = 0, progress: bool = True, queries: int = SANITY_QUERIES) -> Dict:
    """Clean AP50 and AP50 under APGD at every point of the curves, under uniform noise and under the random
    search at `eps` (one pass over the data; each batch's adversarial images are evaluated before the next)."""
    from tqdm import tqdm

    from ..evaluation import coco_evaluate, coco_ground_truth, detections_to_coco

    if queries < 1:
        raise ValueError(f"sanity_curves: queries ({queries}) must be >= 1")
    cfgs = _configs(eps, iterations, restarts, eps_grid, steps_grid, transfer_model is not None, queries)
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
        mask = content_mask(metas, images.shape[-1], images.device)
        for c in cfgs:
            adv = _adversarial(c, model, transfer_model, images, targets, keys, seed, mask)
            with torch.inference_mode():
                results[c] += detections_to_coco(model.predict(adv), metas, dataset.label_to_cat_id)
    gt = coco_ground_truth(dataset)
    ap = {c: coco_evaluate(gt, r, dataset.class_names)["AP50"] for c, r in results.items()}
    return {"clean": coco_evaluate(gt, clean, dataset.class_names)["AP50"],
            "eps_curve": [(e, ap[(e, iterations, 1, "self")]) for e in eps_grid],
            "steps_curve": [(k, ap[(eps, k, 1, "self")]) for k in steps_grid],
            "restarts": [(r, ap[(eps, iterations, r, "self")]) for r in sorted({1, restarts})],
            "transfer": ap.get((eps, iterations, 1, "transfer")), "white_box": ap[(eps, iterations, 1, "self")],
            "noise": ap[(eps, 0, 1, "noise")], "search": ap[(eps, queries, 1, "search")], "queries": queries,
            "n_images": len(dataset), "tolerance": tolerance(len(dataset)),
            "eps": eps, "iterations": iterations, "seconds": time.time() - t0}


def _monotone(curve, what: str, tol: float) -> tuple:
    bad = [f"{what} {b[0]:g}: {b[1]:.4f} > {what} {a[0]:g}: {a[1]:.4f}" for a, b in zip(curve, curve[1:])
           if b[1] > a[1] + tol]
    return not bad, "; ".join(bad) or " ".join(f"{p[1]:.4f}" for p in curve)


def sanity_verdicts(curves: Dict, tol: Optional[float] = None, zero_fraction: float = ZERO_FRACTION) -> List[Check]:
    """Every check on `curves` (`sanity_curves`' result). tol: the AP50 tolerance; default `tolerance(n_images)`
    from the curves' image count (TOLERANCE when they do not say). Each detail ends with the tolerance used."""
    n = curves.get("n_images")
    derived = tol is None
    if derived:
        tol = tolerance(n)
    tol_note = f"tol {tol:.4f}" + (f" = max({TOLERANCE:g}, {TOLERANCE_IMAGES:g}/{n} images)" if derived and n else "")
    checks = []

    def add(name, ok, detail, sign_of, with_tol=True):
        checks.append(Check(name, bool(ok), f"{detail} ({tol_note})" if with_tol else detail, sign_of))

    ok, detail = _monotone(curves["steps_curve"], "steps", tol)
    add("AP50 non-increasing with steps", ok, detail,
        "an attack that does not converge: noisy, stochastic or shattered gradients")
    ok, detail = _monotone(curves["eps_curve"], "eps", tol)
    add("AP50 non-increasing with eps", ok, detail,
        "gradients that stop leading the attack as the ball grows (gradient masking)")
    e_max, ap_max = max(curves["eps_curve"])
    limit = zero_fraction * curves["clean"]
    add(f"AP50 about zero at eps {e_max:g}", ap_max <= limit + 1e-12,
        f"{ap_max:.4f} {'<=' if ap_max <= limit + 1e-12 else '>'} {zero_fraction:g} x clean {curves['clean']:.4f}",
        "gradient masking: even a large budget does not find the way (or eps is not large here)", with_tol=False)
    (r1, ap1), (rn, apn) = curves["restarts"][0], curves["restarts"][-1]
    if rn > r1:
        add("restarts never raise the worst case", apn <= ap1 + tol, f"{rn} restarts {apn:.4f}, {r1} restart {ap1:.4f}",
            "a loss the attack climbs that AP does not follow, or randomness in the model")
        gain = ap1 - apn
        add("restarts do not help much", gain <= RESTART_GAIN * tol,
            f"{rn} restarts lower AP50 by {gain:.4f} ({r1} restart {ap1:.4f}, {rn} restarts {apn:.4f}); allowed "
            f"{RESTART_GAIN:g} x tol = {RESTART_GAIN * tol:.4f}, a few images' worth: starts that converge differ by "
            f"about one",
            "a rugged or masked loss landscape: where a start lands decides the result, one start is not an attack")
    wb = curves["white_box"]
    if curves.get("transfer") is not None:
        tr = curves["transfer"]
        add("transfer does not beat white-box", tr >= wb - tol, f"transfer {tr:.4f}, white-box {wb:.4f}",
            "masked gradients: another model's gradients attack this one better than its own")
    if curves.get("noise") is not None:
        nz = curves["noise"]
        add("uniform noise not stronger than the attack", nz >= wb - tol,
            f"uniform noise at eps {curves['eps']:g} {nz:.4f}, white-box {wb:.4f}",
            "an attack that does worse than chance: its gradients do not lead (masking), or it is broken")
    if curves.get("search") is not None:
        sr = curves["search"]
        add("gradient-free search not stronger than white-box", sr >= wb - tol,
            f"random search ({curves.get('queries')} queries) at eps {curves['eps']:g} {sr:.4f}, white-box {wb:.4f}",
            "masked gradients: the loss's values alone lead further than its gradients")
    return checks


def curve_rows(name: str, curves: Dict) -> Dict[str, float]:
    """One table row: clean AP50, every curve point (eps=..., steps=..., restarts=...), transfer, uniform noise and
    random search (at eps)."""
    row = {"model": name, "clean": curves["clean"]}
    row.update({f"eps {e:g}": ap for e, ap in curves["eps_curve"]})
    row.update({f"steps {k}": ap for k, ap in curves["steps_curve"]})
    row.update({f"restarts {r}": ap for r, ap in curves["restarts"]})
    for key, column in (("transfer", "transfer"), ("noise", "uniform noise"), ("search", "random search")):
        if curves.get(key) is not None:
            row[column] = curves[key]
    return row


def run_checks(model, loader, device, transfer_model: Optional[torch.nn.Module] = None, **kw) -> Dict:
    curves = sanity_curves(model, loader, device, transfer_model=transfer_model, **kw)
    return {"curves": curves, "checks": sanity_verdicts(curves)}
