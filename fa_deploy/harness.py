"""The PGD harness: adversarial images made once from the source weights' gradients, every backend evaluated
on the same clean and adversarial images, and a parity gate on the robustness a deployment loses.

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

from fa_train.evaluation import attack_loss_keys, coco_evaluate, coco_ground_truth, detections_to_coco

from .backends import Backend, TorchBackend, measure_latency


def _cache_key(weights_sha: str, dataset_name: str, attack: str, eps: float, k: int, batch_idx: int, n: int) -> str:
    h = hashlib.sha256(f"{weights_sha}|{dataset_name}|{attack}|{eps}|{k}|{n}".encode()).hexdigest()[:16]
    return f"{h}_b{batch_idx:05d}.npy"


def run_harness(model, backends: Sequence[Backend], loader, device, eps: float = 0.03, steps=(1, 3, 5, 10),
                attack: str = "pgd", cache_dir: Optional[str] = None, weights_sha: str = "", progress: bool = True,
                latency_iters: int = 10, source_path: Optional[str] = None) -> Dict:
    from tqdm import tqdm

    from fa_train.adversarial.attacks import pgd_attack

    source = TorchBackend(model, path=source_path, device=device)
    all_b: List[Backend] = [source, *backends]
    settings = ["clean"] + ([] if attack == "none" else [f"PGD-{k}" for k in steps])
    results = {b.name: {s: [] for s in settings} for b in all_b}
    drift = {b.name: {"clean": [], "adv": []} for b in backends}
    keys = None if attack == "none" else attack_loss_keys(model, attack)
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
        for k in ([] if attack == "none" else steps):
            path = os.path.join(cache_dir, _cache_key(weights_sha, dataset.name, attack, eps, k, bi, len(images))) \
                if cache_dir else None
            if path and os.path.isfile(path):
                inputs[f"PGD-{k}"] = torch.from_numpy(np.load(path)).to(device)
            else:
                bar.set_postfix(attack=f"PGD-{k}")
                adv = pgd_attack(model, inputs["clean"], targets_d, eps=eps, steps=k, step_size=eps / k,
                                 loss_keys=keys)
                inputs[f"PGD-{k}"] = adv
                if path:
                    os.makedirs(cache_dir, exist_ok=True)
                    np.save(path + ".tmp.npy", adv.cpu().numpy())
                    os.replace(path + ".tmp.npy", path)
        for s, x in inputs.items():
            x_np = x.cpu().numpy()
            ref = source.raw(x_np)
            results[source.name][s] += detections_to_coco(model.postprocess(ref), metas, dataset.label_to_cat_id)
            for b in backends:
                out = b.raw(x_np)
                results[b.name][s] += detections_to_coco(model.postprocess(out), metas, dataset.label_to_cat_id)
                d = float(np.mean([np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).mean()
                                   for o, r in zip(out, ref)]))
                drift[b.name]["clean" if s == "clean" else "adv"].append(d)
        n_img += len(images)
        bar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.2f}")
    gt = coco_ground_truth(dataset)
    rows, details = [], {}
    src_row = None
    for b in all_b:
        per = {s: coco_evaluate(gt, results[b.name][s], dataset.class_names) for s in settings}
        row = {"backend": b.name, "format": b.format, "precision": b.precision,
               "provider": getattr(b, "provider", "?"), "size_MB": b.size_mb,
               "clean": per["clean"]["AP50"]}
        if attack != "none":
            for k in steps:
                row[f"PGD-{k}"] = per[f"PGD-{k}"]["AP50"]
            row["advAP"] = sum(row[f"PGD-{k}"] for k in steps) / len(steps)
            row["acAP"] = (row["clean"] + row["advAP"]) / 2
        if src_row is None:
            src_row = row
        row["drop_clean"] = src_row["clean"] - row["clean"]
        if attack != "none":
            row["drop_advAP"] = src_row["advAP"] - row["advAP"]
        if b.name in drift:
            row["drift_clean"] = float(np.mean(drift[b.name]["clean"])) if drift[b.name]["clean"] else 0.0
            row["drift_adv"] = float(np.mean(drift[b.name]["adv"])) if drift[b.name]["adv"] else 0.0
        lat = measure_latency(b, model.postprocess, first_batch, iters=latency_iters,
                              preprocess=lambda: dataset[0])
        row["ms/img"], row["img/s"] = lat["ms_median"], lat["images_per_s"]
        row["p90_ms"], row["pre_ms"], row["post_ms"] = lat["ms_p90"], lat["pre_ms_median"], lat["post_ms_median"]
        rows.append(row)
        details[b.name] = {s: per[s]["stats"] for s in settings}
    return {"rows": rows, "details": details, "eps": eps, "steps": list(steps), "attack": attack, "images": n_img,
            "seconds": time.time() - t0}


def gate(rows: List[Dict], max_drop: float) -> List[str]:
    """Backends whose clean AP50 or advAP is lower than the source's by more than `max_drop`."""
    failures = []
    for r in rows[1:]:
        for key in ("drop_clean", "drop_advAP"):
            if key in r and r[key] > max_drop:
                failures.append(f"{r['backend']}: {key.replace('drop_', '')} lower by {r[key]:.4f} > {max_drop}")
    return failures
