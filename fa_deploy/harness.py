"""The deployment harness: adversarial images made once from the source weights' gradients (the paper's PGD rows
by default, or any of fa-bench's attacks), every backend evaluated on the same clean and adversarial images, and a
parity gate on the robustness a deployment loses.

Engines cannot be differentiated, so the attack is the source model's (a transfer setting for the deployed
model, white-box for the source). Each batch's adversarial images are generated and evaluated on every backend
before the next batch, so memory stays flat as the test set grows; `cache_dir` keeps them on disk to reuse.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fa_train.evaluation import coco_evaluate, coco_ground_truth, detections_to_coco

from .backends import Backend, TorchBackend, measure_latency


CACHE_VERSION = 2  # bump when the attack code changes what a cached image would be


def distinct_names(paths: Sequence[str]) -> List[str]:
    """Row names for files: the base name, or as many trailing path components as it takes to tell files with the
    same base name apart (every export is called last.<precision>.onnx)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    names = []
    for i, pi in enumerate(parts):
        k = 1
        while k < len(pi) and any(pj[-k:] == pi[-k:] for j, pj in enumerate(parts) if j != i):
            k += 1
        names.append("/".join(pi[-k:]))
    return names


def _cache_key(weights_sha: str, dataset, attack: str, eps: float, k: int, image_ids: Sequence[int]) -> str:
    """Everything that determines an adversarial batch: the source weights, the data (name, split, letterbox size),
    the very images of the batch, the attack and its budget."""
    ids = ",".join(str(int(i)) for i in image_ids)
    h = hashlib.sha256(f"v{CACHE_VERSION}|{weights_sha}|{dataset.name}|{dataset.img_size}|{attack}|{eps!r}|{k}|{ids}"
                       .encode()).hexdigest()[:24]
    return f"{h}.npy"


def _load_cached(path: str, shape) -> Optional[np.ndarray]:
    """A cached batch, or None when absent; a file of another shape or a truncated file is an error naming it."""
    if not os.path.isfile(path):
        return None
    try:
        arr = np.load(path)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--cache-dir: {path} is truncated or corrupt ({e}); delete it to regenerate") from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float32:
        raise ValueError(f"--cache-dir: {path} holds {arr.dtype}{list(arr.shape)}, the batch is float32"
                         f"{list(shape)}; delete it to regenerate")
    return arr


def _column_cache_id(col) -> tuple:
    """(attack, k) for the cache key: the attack and its budget ("per-image": images cached before the attacks'
    objective became each image's own loss are not reused)."""
    from fa_train.adversarial.suite import PAPER_ROW_ATTACKS

    if col.attack in PAPER_ROW_ATTACKS:
        return f"{col.attack}|per-image", col.budget.iterations
    b, obj = col.budget, col.objective
    return (f"{col.column}|it{b.iterations}|r{b.restarts}|s{b.seed}|score{getattr(obj, 'score_thres', '')}", 0)


def _adversarial_inputs(model, plan, clean, targets, keys, cache_dir, weights_sha, dataset, eps, bar,
                        with_losses: bool):
    """Per column of the attack plan, the batch's adversarial images (from `cache_dir` when there) and, for the
    worst case, each image's ground-truth loss on the source."""
    from fa_train.adversarial.attacks import run_attack
    from fa_train.adversarial.suite import ground_truth_losses

    inputs, losses = {}, {}
    for col in plan:
        attack_id, k = _column_cache_id(col)
        path = os.path.join(cache_dir, _cache_key(weights_sha, dataset, attack_id, eps, k, keys)) \
            if cache_dir else None
        cached = _load_cached(path, clean.shape) if path else None
        if cached is not None:
            adv = torch.from_numpy(cached).to(clean.device)
        else:
            bar.set_postfix(attack=col.column)
            adv = run_attack(model, col.objective, col.rule, col.budget, clean, targets, image_keys=keys).images
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                np.save(path + ".tmp.npy", adv.cpu().numpy())
                os.replace(path + ".tmp.npy", path)
        inputs[col.column] = adv
        if with_losses:
            losses[col.column] = ground_truth_losses(model, adv, targets)
    return inputs, losses


def run_harness(model, backends: Sequence[Backend], loader, device, eps: float = 0.03, steps=(1, 3, 5, 10),
                attack="pgd", cache_dir: Optional[str] = None, weights_sha: str = "", progress: bool = True,
                latency_iters: int = 10, source_path: Optional[str] = None, apgd_iterations: int = 20,
                restarts: int = 1, tog_score: float = 0.5, seed: int = 0) -> Dict:
    """`attack`: any of fa-bench's attacks or a list of them (fa_train/adversarial/suite.py); with more than one,
    a "worst" column: per image the candidate with the largest ground-truth loss on the source, the same images
    for every backend."""
    from tqdm import tqdm

    from fa_train.adversarial.suite import PAPER_ROW_ATTACKS, AttackSettings, attack_plan, parse_attacks, worst_row

    attack_names = parse_attacks(attack)
    plan = [] if attack_names == ("none",) else attack_plan(
        model, attack_names, AttackSettings(eps, tuple(steps), apgd_iterations, restarts, tog_score, seed))
    paper = any(n in PAPER_ROW_ATTACKS for n in attack_names)
    with_worst = len(attack_names) > 1
    columns = [c.column for c in plan]
    source = TorchBackend(model, path=source_path, device=device)
    all_b: List[Backend] = [source, *backends]
    settings = ["clean"] + columns + (["worst"] if with_worst else [])
    # keyed by position: two files may share a name (every export is last.<precision>.onnx)
    results = [{s: [] for s in settings} for _ in all_b]
    drift = [{"clean": [], "adv": []} for _ in all_b]
    dataset = loader.dataset
    model.eval()
    t0, n_img = time.time(), 0
    first_batch = None
    bar = tqdm(loader, desc=f"harness ({len(all_b)} backends)", leave=False, disable=None if progress else True,
               unit="batch")
    for bi, (images, targets, metas) in enumerate(bar):
        if first_batch is None:
            first_batch = images.numpy()
        targets_d = [{k: v.to(device) for k, v in t.items()} for t in targets]
        inputs = {"clean": images.to(device)}
        adv, losses = _adversarial_inputs(model, plan, inputs["clean"], targets_d, [m["image_id"] for m in metas],
                                          cache_dir, weights_sha, dataset, eps, bar, with_worst)
        inputs.update(adv)
        dets = [{} for _ in all_b]
        for s, x in inputs.items():
            x_np = x.cpu().numpy()
            ref = source.raw(x_np)
            dets[0][s] = model.postprocess(ref)
            for i, b in enumerate(backends, 1):
                out = b.raw(x_np)
                dets[i][s] = model.postprocess(out)
                d = float(np.mean([np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).mean()
                                   for o, r in zip(out, ref)]))
                drift[i]["clean" if s == "clean" else "adv"].append(d)
        if with_worst:  # per image the source's largest-loss candidate, the same images for every backend
            pick = torch.stack([losses[c] for c in columns]).argmax(0).tolist()
            for d in dets:
                d["worst"] = [d[columns[j]][i] for i, j in enumerate(pick)]
        for i, d in enumerate(dets):
            for s, dd in d.items():
                results[i][s] += detections_to_coco(dd, metas, dataset.label_to_cat_id)
        n_img += len(images)
        bar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.2f}")
    gt = coco_ground_truth(dataset)
    rows, details = [], {}
    src_row = None
    names = ["source"] + distinct_names([b.path or b.name for b in backends])
    for i, (b, name) in enumerate(zip(all_b, names)):
        per = {s: coco_evaluate(gt, results[i][s], dataset.class_names) for s in settings}
        row = {"backend": name, "path": b.path, "format": b.format, "precision": b.precision,
               "provider": getattr(b, "provider", "?"), "size_MB": b.size_mb,
               "clean": per["clean"]["AP50"]}
        for c in columns:
            row[c] = per[c]["AP50"]
        if paper:
            row["advAP"] = sum(row[f"PGD-{k}"] for k in steps) / len(steps)
            row["acAP"] = (row["clean"] + row["advAP"]) / 2
        if with_worst:
            row["worst"], _ = worst_row(row, per["worst"]["AP50"], columns)
        if src_row is None:
            src_row = row
        for key in drop_keys(columns, paper, with_worst):
            row[f"drop_{key}"] = src_row[key] - row[key]
        if i > 0:
            row["drift_clean"] = float(np.mean(drift[i]["clean"])) if drift[i]["clean"] else 0.0
            row["drift_adv"] = float(np.mean(drift[i]["adv"])) if drift[i]["adv"] else 0.0
        lat = measure_latency(b, model.postprocess, first_batch, iters=latency_iters,
                              preprocess=lambda: dataset[0])
        row["ms/img"], row["img/s"] = lat["ms_median"], lat["images_per_s"]
        row["p90_ms"], row["pre_ms"], row["post_ms"] = lat["ms_p90"], lat["pre_ms_median"], lat["post_ms_median"]
        rows.append(row)
        details[name] = {s: per[s]["stats"] for s in settings}
    return {"rows": rows, "details": details, "eps": eps, "steps": list(steps), "attack": ",".join(attack_names),
            "columns": columns, "images": n_img, "seconds": time.time() - t0}


def drop_keys(columns: Sequence[str], paper: bool, with_worst: bool) -> List[str]:
    """The AP50 columns the gate compares with the source: clean, advAP (PGD rows), worst (several attacks);
    with a single attack other than the PGD rows, that attack's column."""
    keys = ["clean"] + (["advAP"] if paper else []) + (["worst"] if with_worst else [])
    if len(keys) == 1:
        keys += list(columns)
    return keys


def gate(rows: List[Dict], max_drop: float) -> List[str]:
    """Backends whose clean AP50 or adversarial AP50 (advAP, worst, or the single attack's) is lower than the
    source's by more than `max_drop`."""
    failures = []
    for r in rows[1:]:
        for key in [k for k in r if k.startswith("drop_")]:
            if r[key] > max_drop:
                failures.append(f"{r['backend']}: {key.replace('drop_', '')} lower by {r[key]:.4f} > {max_drop}")
    return failures
