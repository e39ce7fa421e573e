"""COCO-style evaluation through pycocotools (AP at IoU 0.5 is the paper's metric).

Ground truth comes from the dataset's records in original image coordinates; predictions are mapped back
from letterboxed pixels exactly. Ignore-flagged objects (VOC `difficult`, COCO crowd) become `iscrowd=1`
regions: pycocotools neither counts them as misses nor counts detections matched to them as false positives.
"""
from __future__ import annotations

import contextlib
import io
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import distributed as D
from .data.transforms import content_mask, unletterbox_boxes

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_ground_truth(dataset) -> dict:
    images, anns = [], []
    for r in dataset.records:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height), "file_name": r.file})
        for k in range(len(r.boxes)):
            x0, y0, x1, y1 = (float(v) for v in r.boxes[k])
            area = float(r.area[k]) if r.area is not None else (x1 - x0) * (y1 - y0)
            anns.append({"id": len(anns) + 1, "image_id": int(r.image_id),
                         "category_id": int(dataset.label_to_cat_id[int(r.labels[k])]),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": int(bool(r.ignore[k]))})
    cats = [{"id": int(cid), "name": n} for cid, n in zip(dataset.label_to_cat_id, dataset.class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def detections_to_coco(dets: Sequence[dict], metas: Sequence[dict], label_to_cat_id) -> List[dict]:
    """Letterboxed detections -> COCO result dicts in original pixels (xywh)."""
    out = []
    for d, m in zip(dets, metas):
        boxes = unletterbox_boxes(torch.as_tensor(d["boxes"]).float().cpu(), m).numpy()
        scores = torch.as_tensor(d["scores"]).float().cpu().numpy()
        labels = torch.as_tensor(d["labels"]).long().cpu().numpy()
        for b, s, l in zip(boxes, scores, labels):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            if w <= 0 or h <= 0:
                continue
            out.append({"image_id": int(m["image_id"]), "category_id": int(label_to_cat_id[int(l)]),
                        "bbox": [float(b[0]), float(b[1]), w, h], "score": float(s)})
    return out


def coco_evaluate(gt: dict, results: List[dict], class_names: Sequence[str], iou_type: str = "bbox") -> Dict:
    """Run pycocotools once; returns the 12 COCO stats, AP50, and per-class AP50."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    stats = {k: 0.0 for k in COCO_STAT_NAMES}
    per_class = {n: 0.0 for n in class_names}
    if not results or not gt["annotations"]:
        return {"AP50": 0.0, "stats": stats, "per_class_AP50": per_class, "num_detections": len(results)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(COCO_STAT_NAMES, ev.stats)}
    # precision: [T IoU, R recall, K classes, A areas, M maxDets]; IoU 0.5 is index 0, area all, maxDets 100
    prec = ev.eval["precision"][0, :, :, 0, -1]
    for k, cat_id in enumerate(ev.params.catIds):
        p = prec[:, k]
        p = p[p > -1]
        name = next(c["name"] for c in gt["categories"] if c["id"] == cat_id)
        per_class[name] = float(p.mean()) if p.size else float("nan")
    return {"AP50": stats["AP50"], "stats": stats, "per_class_AP50": per_class, "num_detections": len(results)}


def evaluate(model, loader, device, image_transform: Optional[Callable] = None, progress: bool = True,
             desc: str = "eval", postprocess_kw: Optional[dict] = None) -> Dict:
    """Clean (or transformed: `image_transform(images, targets) -> images`) AP of `model` on `loader`."""
    from tqdm import tqdm

    dataset = loader.dataset
    model.eval()
    results = []
    t0 = time.time()
    n = 0
    it = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, unit="batch")
    for images, targets, metas in it:
        images = images.to(device, non_blocking=True)
        if image_transform is not None:
            images = image_transform(images, targets)
        with torch.inference_mode():
            dets = model.predict(images, **(postprocess_kw or {}))
        results += detections_to_coco(dets, metas, dataset.label_to_cat_id)
        n += len(images)
        it.set_postfix(img_s=f"{n / max(time.time() - t0, 1e-9):.1f}")
    # under torchrun each rank evaluated its shard: gather the detections, run pycocotools once on rank 0
    results = D.gather_list(results)
    n = int(D.all_reduce_values([n])[0])
    out = coco_evaluate(coco_ground_truth(dataset), results, dataset.class_names) if D.is_main() else None
    out = D.broadcast_object(out)
    out["images"] = n
    out["seconds"] = time.time() - t0
    return out


def format_ap_table(result: Dict, title: str = "clean AP50") -> str:
    rows = [(name, ap) for name, ap in result["per_class_AP50"].items()]
    width = max([len(r[0]) for r in rows] + [len("mean (AP50)")])
    lines = [title, "-" * (width + 10)]
    for name, ap in rows:
        lines.append(f"{name:<{width}}  {ap:7.4f}")
    lines.append("-" * (width + 10))
    lines.append(f"{'mean (AP50)':<{width}}  {result['AP50']:7.4f}")
    lines.append(f"{'COCO AP':<{width}}  {result['stats']['AP']:7.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- robustness

PAPER_STEPS = (1, 3, 5, 10)


def attack_loss_keys(model, attack: str):
    """Loss keys an attack differentiates: all for "pgd", one TOD domain for "cls" / "loc"."""
    if attack == "pgd":
        return None
    if attack not in model.loss_domains:
        raise ValueError(f"--attack {attack!r}: expected pgd or one of {sorted(model.loss_domains)}")
    return model.loss_domains[attack]


def robustness_columns(names: Sequence[str], steps=PAPER_STEPS, worst: Optional[bool] = None) -> List[str]:
    """The AP50 columns `robustness` fills for these attacks (after "clean")."""
    from .adversarial.suite import PAPER_ROW_ATTACKS

    cols = []
    if any(n in PAPER_ROW_ATTACKS for n in names):
        cols += [f"PGD-{k}" for k in steps] + ["advAP", "acAP"]
    cols += [n for n in names if n not in PAPER_ROW_ATTACKS]
    if _with_worst(names, worst):
        cols.append("worst")
    return cols


def _with_worst(names, worst):
    return len(names) > 1 if worst is None else worst


def robustness(model, loader, device, eps: float = 0.03, steps=PAPER_STEPS, attack="pgd",
               progress: bool = True, postprocess_kw: Optional[dict] = None, log=None, apgd_iterations: int = 20,
               restarts: int = 1, tog_score: float = 0.5, seed: int = 0, worst: Optional[bool] = None,
               attack_padding: bool = False) -> Dict:
    """AP50 under attacks. `attack`: one name, a comma-separated list or a sequence of names, "suite" for the
    paper's PGD rows + apgd + the TOG attacks + cwa (fa_train/adversarial/suite.py).

    The paper's protocol (pgd, cls, loc): clean AP50 and AP50 under PGD-k (step eps/k, no random start) for each
    k; advAP = mean over k, acAP = (clean + advAP) / 2. Every other attack adds its AP50 column. With more than
    one attack (or `worst=True`), "worst": per image the adversarial candidate with the largest ground-truth
    detection loss over all attacks, AP50 over those images, and never above any single attack's AP50 (see
    `suite.worst_row`). TOG attacks also count what they did to the confident clean detections (`tog`).

    Every attack maximises each image's own loss, its random starts seeded by the image id: results do not
    depend on the batch size. Each batch's adversarial images are made and evaluated before the next batch, so
    memory stays flat. The letterbox padding the data pipeline adds stays clean (an attacker perturbs the image,
    not the pipeline's padding) unless `attack_padding`.
    """
    from tqdm import tqdm

    from .adversarial.suite import (PAPER_ROW_ATTACKS, TOG_ATTACKS, AttackSettings, TogEffects, WorstCase,
                                    attack_plan, candidates, parse_attacks, worst_row)

    names = parse_attacks(attack)
    settings = AttackSettings(eps, tuple(steps), apgd_iterations, restarts, tog_score, seed)
    plan = attack_plan(model, names, settings)
    with_worst = _with_worst(names, worst)
    dataset = loader.dataset
    model.eval()
    pk = postprocess_kw or {}
    columns = [c.column for c in plan]
    results = {n: [] for n in ["clean"] + columns + (["worst"] if with_worst else [])}
    effects = {c.column: TogEffects() for c in plan if c.attack in TOG_ATTACKS}
    t0, n_img = time.time(), 0
    bar = tqdm(loader, desc=f"{','.join(names)} eps={eps:g}", leave=False, disable=None if progress else True,
               unit="batch")
    for images, targets, metas in bar:
        images = images.to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        keys = [m["image_id"] for m in metas]
        with torch.inference_mode():
            clean = model.predict(images, **pk)
        results["clean"] += detections_to_coco(clean, metas, dataset.label_to_cat_id)
        wc = WorstCase(len(images)) if with_worst else None
        worst_dets = [None] * len(images)
        mask = None if attack_padding else content_mask(metas, images.shape[-1], device)
        for col, adv, loss in candidates(model, images, targets, plan, image_keys=keys, need_losses=with_worst,
                                         mask=mask):
            bar.set_postfix(attack=col.column, img_s=f"{n_img / max(time.time() - t0, 1e-9):.2f}")
            with torch.inference_mode():
                dets = model.predict(adv, **pk)
            results[col.column] += detections_to_coco(dets, metas, dataset.label_to_cat_id)
            if wc is not None:
                for i in torch.where(wc.update(col.column, loss))[0].tolist():
                    worst_dets[i] = dets[i]
                worst_dets = [d if d is not None else dets[i] for i, d in enumerate(worst_dets)]  # NaN losses
            if col.column in effects:
                for c, a in zip(clean, dets):
                    effects[col.column].add(c, a, tog_score)
        if with_worst:
            results["worst"] += detections_to_coco(worst_dets, metas, dataset.label_to_cat_id)
        n_img += len(images)
        bar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.2f}")
    results = {n: D.gather_list(r) for n, r in results.items()}  # shards of every rank, then pycocotools once
    n_img = int(D.all_reduce_values([n_img])[0])
    tog = {}
    for c, e in effects.items():
        counts = e.as_dict()
        tog[c] = dict(zip(counts, (int(v) for v in D.all_reduce_values(list(counts.values())))))
    per = None
    if D.is_main():
        gt = coco_ground_truth(dataset)
        per = {n: coco_evaluate(gt, r, dataset.class_names) for n, r in results.items()}
    per = D.broadcast_object(per)
    row = {n: per[n]["AP50"] for n in ["clean"] + columns}
    if any(n in PAPER_ROW_ATTACKS for n in names):
        row["advAP"] = sum(row[f"PGD-{k}"] for k in steps) / len(steps)
        row["acAP"] = (row["clean"] + row["advAP"]) / 2
    out = {"eps": eps, "steps": list(steps), "attack": ",".join(names), "attacks": list(names),
           "columns": ["clean"] + robustness_columns(names, steps, worst), "images": n_img, "tog": tog,
           "settings": {"apgd_iterations": apgd_iterations, "restarts": restarts, "tog_score": tog_score,
                        "seed": seed}}
    if with_worst:
        row["worst"], out["worst_from"] = worst_row(row, per["worst"]["AP50"], columns)
        out["worst_loss_selected"] = per["worst"]["AP50"]
    out.update(row=row, details=per, seconds=time.time() - t0)
    return out
