"""The deployment harness: every backend evaluated on the same clean images and on adversarial images made three
ways (`--threat`, fa_deploy/robustness/threats.py): from the source weights' gradients (transfer: the same images for every
backend), on the backend's own differentiable twin (white-box), and on the twin against the source's agreement
(differential); the paper's PGD rows by default, or any of fa-bench's attacks. Per backend and threat: AP50,
deployment-only misses and output drift; a gate on each backend's worst case over its threats.

Each batch's adversarial images are generated and evaluated on every backend before the next batch, so memory
stays flat as the test set grows; `cache_dir` keeps them on disk to reuse (keyed by threat and deployed file).
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fa_train.evaluation import coco_evaluate, coco_ground_truth, detections_to_coco

from fa_deploy.robustness.threats import deployment_misses, Differential, worst_over_threats
from fa_deploy.runtime.backends import Backend, measure_latency, TorchBackend


CACHE_VERSION = 3  # 3: letterbox padding left clean, random starts seeded per attack; bump when the attack code changes what a cached image would be


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
    """A cached batch, or None when absent. A truncated or corrupt file, or one of another shape (an interrupted
    copy, a disk that filled up: bad input, not a bug), is also None, said in one line: the caller regenerates it."""
    if not os.path.isfile(path):
        return None
    try:
        arr = np.load(path)
    except (ValueError, OSError, EOFError) as e:
        _say(f"--cache-dir: {path} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
             f": regenerating it")
        return None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float32:
        _say(f"--cache-dir: {path} holds {arr.dtype}{list(arr.shape)}, the batch is float32{list(shape)}: "
             f"regenerating it")
        return None
    return arr


def _say(msg: str) -> None:
    import sys

    from tqdm import tqdm

    tqdm.write(f"fa-bench: warning: {msg}", file=sys.stderr)


def _column_cache_id(col) -> tuple:
    """(attack, k) for the cache key: the attack and its budget ("per-image": images cached before the attacks'
    objective became each image's own loss are not reused)."""
    from fa_train.adversarial.suite import PAPER_ROW_ATTACKS

    if col.attack in PAPER_ROW_ATTACKS:
        return f"{col.attack}|per-image", col.budget.iterations
    b, obj = col.budget, col.objective
    return (f"{col.column}|it{b.iterations}|r{b.restarts}|s{b.seed}|score{getattr(obj, 'score_thres', '')}", 0)


def _adversarial_inputs(attacker, plan, clean, targets, keys, cache_dir, cache_id, weights_sha, dataset, eps, bar,
                        with_losses: bool, wrap=None, mask=None):
    """Per column of the attack plan, the batch's adversarial images made on `attacker` (the source, or a
    deployed file's twin), from `cache_dir` when there, and for the worst case each image's ground-truth loss on
    the attacker. `wrap` turns the column's objective into the threat's (the differential one); `cache_id` names
    the threat and the deployed file's hash in the cache key; `mask` the pixels an attack may change (None: all,
    `--attack-padding`; named in the cache key)."""
    from fa_train.adversarial.suite import ColumnRunner, ground_truth_losses

    runner = ColumnRunner(attacker, clean, targets, keys, mask)
    if mask is None:
        cache_id += "|padding"  # PGD-1/3/5/10 share their first gradient
    inputs, losses = {}, {}
    for col in plan:
        attack_id, k = _column_cache_id(col)
        path = os.path.join(cache_dir, _cache_key(weights_sha, dataset, f"{cache_id}|{attack_id}", eps, k, keys)) \
            if cache_dir else None
        cached = _load_cached(path, clean.shape) if path else None
        if cached is not None:
            adv = torch.from_numpy(cached).to(clean.device)
        else:
            bar.set_postfix(attack=f"{col.column} {cache_id.split('|')[0]}")
            objective = wrap(col.objective) if wrap else col.objective
            adv = runner.run(col, objective).images
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                np.save(path + ".tmp.npy", adv.cpu().numpy())
                os.replace(path + ".tmp.npy", path)
        inputs[col.column] = adv
        if with_losses:
            losses[col.column] = ground_truth_losses(attacker, adv, targets)
    return inputs, losses


class _Tally:
    """What one (backend, threat) accumulates: COCO detections per setting, output drift against the source,
    and deployment-only misses on the clean and on the adversarial images."""

    def __init__(self, settings):
        self.results = {s: [] for s in settings}
        self.drift = {"clean": [], "adv": []}
        self.misses = {"clean": [0, 0], "adv": [0, 0]}
        self.out_drift = {"clean": {}, "adv": {}}  # per output: [sum |backend - source|, sum |source|]

    def add_output_drift(self, kind: str, outs, refs) -> None:
        for j, (o, r) in enumerate(zip(outs, refs)):
            o, r = np.asarray(o, np.float64), np.asarray(r, np.float64)
            acc = self.out_drift[kind].setdefault(j, [0.0, 0.0])
            acc[0] += float(np.abs(o - r).sum()) if o.shape == r.shape else float("inf")
            acc[1] += float(np.abs(r).sum())

    def output_drift(self, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
        """Per output: mean |backend - source| / mean |source| on clean and on adversarial images."""
        out: Dict[str, Dict[str, float]] = {}
        for kind, per in self.out_drift.items():
            for j, (diff, ref) in per.items():
                name = names[j] if j < len(names) else f"output {j}"
                out.setdefault(name, {})[kind] = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
        return out

    def add_misses(self, kind: str, counts) -> None:
        self.misses[kind][0] += counts[0]
        self.misses[kind][1] += counts[1]

    def miss_fraction(self, kind: str) -> Optional[float]:
        detected, missed = self.misses[kind]
        return missed / detected if detected else None


def run_harness(model, backends: Sequence[Backend], loader, device, eps: float = 0.03, steps=(1, 3, 5, 10),
                attack="pgd", cache_dir: Optional[str] = None, weights_sha: str = "", progress: bool = True,
                latency_iters: int = 10, source_path: Optional[str] = None, apgd_iterations: int = 20,
                restarts: int = 1, tog_score: float = 0.5, seed: int = 0, threats: Sequence[str] = ("transfer",),
                twins: Optional[Sequence] = None, backend_hashes: Optional[Sequence[str]] = None,
                diff_weight: float = 1.0, detect_score: float = 0.25, attack_padding: bool = False) -> Dict:
    """`attack`: any of fa-bench's attacks or a list of them (fa_train/adversarial/suite.py); with more than one,
    a "worst" column: per image the candidate with the largest ground-truth loss on the model the attack ran on.
    `threats` (fa_deploy/robustness/threats.py): transfer (images from the source, the same for every backend), whitebox and
    differential (images from each backend's verified twin in `twins`, evaluated on that backend). One row per
    backend and threat, and with several threats a "worst" row per backend: each AP50 column's minimum and each
    miss fraction's maximum over its threats, its advAP / acAP / drops computed from those columns. The attacks
    leave the letterbox padding clean unless `attack_padding`."""
    from tqdm import tqdm

    from fa_train.data.transforms import content_mask

    from fa_train.adversarial.suite import PAPER_ROW_ATTACKS, AttackSettings, attack_plan, parse_attacks, worst_row


    attack_names = parse_attacks(attack)
    none = attack_names == ("none",)
    settings_ = AttackSettings(eps, tuple(steps), apgd_iterations, restarts, tog_score, seed)
    plan = [] if none else attack_plan(model, attack_names, settings_)
    threats = ("transfer",) if none else tuple(threats)
    attacked = [t for t in threats if t != "transfer"]
    if attacked and (twins is None or len(twins) != len(backends) or any(tw is None for tw in twins)):
        raise ValueError(f"run_harness: threats {attacked} need a verified twin for every backend")
    plans = {"transfer": plan}
    for i, tw in enumerate(twins or []):  # the objectives (TOG's clean detections, ...) are the twin's own
        plans[i] = [] if none else attack_plan(tw, attack_names, settings_)
    paper = any(n in PAPER_ROW_ATTACKS for n in attack_names)
    with_worst = len(attack_names) > 1
    columns = [c.column for c in plan]
    source = TorchBackend(model, path=source_path, device=device)
    all_b: List[Backend] = [source, *backends]
    settings = ["clean"] + columns + (["worst"] if with_worst else [])
    # keyed by position: two files may share a name (every export is last.<precision>.onnx)
    src_tally = _Tally(settings)
    tallies = [{t: _Tally(settings) for t in threats} for _ in backends]
    hashes = list(backend_hashes or [""] * len(backends))
    dataset = loader.dataset
    model.eval()
    t0, n_img = time.time(), 0
    first_batch = None
    desc = f"harness ({len(all_b)} backends" + (f", threats {'/'.join(threats)})" if not none else ")")
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, unit="batch")

    def score(images_by_setting, losses, targets, metas, which, threat, with_source):
        """Evaluate the source and the backends `which` on the images of each setting; accumulate."""
        src_dets, dep = {}, {i: {} for i in which}
        for s, x in images_by_setting.items():
            x_np = x.cpu().numpy()
            ref = source.raw(x_np)
            src_dets[s] = model.postprocess(ref)
            kind = "clean" if s == "clean" else "adv"
            for i in which:
                out = backends[i].raw(x_np)
                dep[i][s] = model.postprocess(out)
                d = float(np.mean([np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64)).mean()
                                   for o, r in zip(out, ref)]))
                ts = [tallies[i][threat]] if threat else list(tallies[i].values())
                for tl in ts:
                    tl.drift[kind].append(d)
                    tl.add_output_drift(kind, out, ref)
                    tl.add_misses(kind, deployment_misses(targets, src_dets[s], dep[i][s], detect_score))
        if with_worst and losses:  # per image the largest-loss candidate of the model the attack ran on
            cols = list(losses)
            pick = torch.stack([losses[c] for c in cols]).argmax(0).tolist()
            src_dets["worst"] = [src_dets[cols[j]][n] for n, j in enumerate(pick)]
            for i in which:
                dep[i]["worst"] = [dep[i][cols[j]][n] for n, j in enumerate(pick)]
        for s, d in src_dets.items():
            if with_source:
                src_tally.results[s] += detections_to_coco(d, metas, dataset.label_to_cat_id)
        for i in which:
            ts = [tallies[i][threat]] if threat else list(tallies[i].values())
            coco = {s: detections_to_coco(d, metas, dataset.label_to_cat_id) for s, d in dep[i].items()}
            for tl in ts:
                for s, c in coco.items():
                    tl.results[s] += c

    everyone = list(range(len(backends)))
    for images, targets, metas in bar:
        if first_batch is None:
            first_batch = images.numpy()
        targets_d = [{k: v.to(device) for k, v in t.items()} for t in targets]
        ids = [m["image_id"] for m in metas]
        clean = images.to(device)
        mask = None if attack_padding else content_mask(metas, images.shape[-1], device)
        # clean images: the same for every threat
        score({"clean": clean}, None, targets, metas, everyone, None, True)
        if not none:
            # the source's own attack: the source's adversarial AP (white-box for it) and the transfer threat
            adv, losses = _adversarial_inputs(model, plan, clean, targets_d, ids, cache_dir, "transfer", weights_sha,
                                              dataset, eps, bar, with_worst, mask=mask)
            score(adv, losses, targets, metas, everyone if "transfer" in threats else [], "transfer", True)
            for i in everyone:
                for threat in attacked:
                    wrap = None if threat == "whitebox" else (
                        lambda obj: Differential(obj, model, diff_weight, detect_score))
                    cache_id = f"{threat}|{hashes[i]}" + (f"|w{diff_weight!r}|s{detect_score!r}"
                                                          if threat == "differential" else "")
                    adv, losses = _adversarial_inputs(twins[i], plans[i], clean, targets_d, ids, cache_dir, cache_id,
                                                      weights_sha, dataset, eps, bar, with_worst, wrap, mask)
                    score(adv, losses, targets, metas, [i], threat, False)
        n_img += len(images)
        bar.set_postfix(img_s=f"{n_img / max(time.time() - t0, 1e-9):.2f}")
    gt = coco_ground_truth(dataset)
    names = ["source"] + distinct_names([b.path or b.name for b in backends])
    ap_keys = settings + (["advAP", "acAP"] if paper else [])

    clean_of: Dict[int, dict] = {}  # a backend's clean detections are the same under every threat: evaluated once

    def ap_row(tally, base, backend: Optional[int] = None):
        per = {}
        for s in settings:
            if s == "clean" and backend in clean_of:
                per[s] = clean_of[backend]
            else:
                per[s] = coco_evaluate(gt, tally.results[s], dataset.class_names)
        if backend is not None:
            clean_of.setdefault(backend, per["clean"])
        row = dict(base, clean=per["clean"]["AP50"])
        for c in columns:
            row[c] = per[c]["AP50"]
        if paper:
            row["advAP"] = sum(row[f"PGD-{k}"] for k in steps) / len(steps)
            row["acAP"] = (row["clean"] + row["advAP"]) / 2
        if with_worst:
            row["worst"], _ = worst_row(row, per["worst"]["AP50"], columns)
        return row, {s: per[s]["stats"] for s in settings}

    lat_of = []
    for b in all_b:
        lat = measure_latency(b, model.postprocess, first_batch, iters=latency_iters, preprocess=lambda: dataset[0])
        lat_of.append({"ms/img": lat["ms_median"], "img/s": lat["images_per_s"], "p90_ms": lat["ms_p90"],
                       "pre_ms": lat["pre_ms_median"], "post_ms": lat["post_ms_median"]})

    def base_of(b, name):
        return {"backend": name, "threat": None, "path": b.path, "format": b.format,
                "precision": b.precision, "provider": getattr(b, "provider", "?"), "size_MB": b.size_mb}

    drops = drop_keys(columns, paper, with_worst)
    details = {}
    src_row, details["source"] = ap_row(src_tally, base_of(source, "source"))
    src_row["threat"] = "-" if none else "own"
    for key in drops:
        src_row[f"drop_{key}"] = 0.0
    src_row.update(lat_of[0])
    rows = [src_row]
    miss_keys = ["misses_clean"] + ([] if none else ["misses_adv"])
    for i, (b, name) in enumerate(zip(backends, names[1:])):
        group = []
        for threat in threats:
            tl = tallies[i][threat]
            row, details[f"{name} [{threat}]"] = ap_row(tl, base_of(b, name), i)
            row["threat"] = threat
            row["misses_clean"] = tl.miss_fraction("clean")
            if not none:
                row["misses_adv"] = tl.miss_fraction("adv")
            row["drift_clean"] = float(np.mean(tl.drift["clean"])) if tl.drift["clean"] else 0.0
            row["drift_adv"] = float(np.mean(tl.drift["adv"])) if tl.drift["adv"] else 0.0
            row["drift_outputs"] = tl.output_drift(list(getattr(b, "output_names", None) or []))
            group.append(row)
        if len(group) > 1:
            worst = worst_over_threats(group, ap_keys, miss_keys, [f"PGD-{k}" for k in steps] if paper else ())
            worst["drift_clean"] = max(r["drift_clean"] for r in group)
            worst["drift_adv"] = max(r["drift_adv"] for r in group)
            worst["drift_outputs"] = {o: {k: max(r["drift_outputs"][o][k] for r in group if k in r["drift_outputs"][o])
                                          for k in v} for o, v in group[0]["drift_outputs"].items()}
            group.append(worst)
        for row in group:
            for key in drops:
                row[f"drop_{key}"] = src_row[key] - row[key]
            row.update(lat_of[i + 1])
        rows += group
    return {"rows": rows, "details": details, "eps": eps, "steps": list(steps), "attack": ",".join(attack_names),
            "columns": columns, "threats": list(threats), "images": n_img, "seconds": time.time() - t0,
            "detect_score": detect_score, "diff_weight": diff_weight if "differential" in threats else None}


def drop_keys(columns: Sequence[str], paper: bool, with_worst: bool) -> List[str]:
    """The AP50 columns the gate compares with the source: clean, advAP (PGD rows), worst (several attacks);
    with a single attack other than the PGD rows, that attack's column."""
    keys = ["clean"] + (["advAP"] if paper else []) + (["worst"] if with_worst else [])
    if len(keys) == 1:
        keys += list(columns)
    return keys


# --max-drift defaults: how far each output of a deployed file may drift from the source's on the same images
# (mean |backend - source| / mean |source|, per output, over clean and over adversarial images), per precision.
# Measured 2026-12-02 on the test fixtures (tests/conftest.py's overfit YOLOv3 and tests' tiny Faster R-CNN, 8
# images: 4 test images and the same with uniform noise 0.03, ONNX Runtime CPU): YOLOv3 (its raw output holds every
# anchor's prediction in a fixed order) fp32 8e-8, fp16 9e-5, int8 0.018 (with 4 activation scales halved: 0.021);
# its fp32 file with the stride-32 prediction conv scaled by 0.7: 0.012, with AP50 unchanged. Faster R-CNN's raw
# output is its detection list ranked by score, which reduced precision reorders and shortens or lengthens: fp32
# 3e-8, fp16 0.059, int8 0.50 (a ratio without bound when the backend detects more than the source), so there
# only fp32 files are gated on drift by default (--max-drift gates every precision). Each default leaves a
# margin of 5-10x over the spread.
DRIFT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3, "int8": 0.1}
DRIFT_TOLERANCE_BY_MODEL = {"fasterrcnn_resnet50_fpn": {"fp32": 1e-4}}


def drift_tolerance(precision: str, max_drift: Optional[float] = None, model: Optional[str] = None) -> Optional[float]:
    """The drift a backend of `precision` may show: `max_drift` when given, else the default of its precision (for
    `model`'s kind of output); None for a precision without one (not gated on drift)."""
    if max_drift is not None:
        return max_drift
    return DRIFT_TOLERANCE_BY_MODEL.get(model, DRIFT_TOLERANCE).get(precision)


def gate(rows: List[Dict], max_drop: float, max_misses: Optional[float] = None, max_drift: Optional[float] = None,
         drift_gate: bool = False, model: Optional[str] = None) -> List[str]:
    """Backends whose clean AP50 or adversarial AP50 (advAP, worst, or the single attack's) is lower than the
    source's by more than `max_drop`, or whose deployment-only misses exceed `max_misses`: on each backend's worst
    case over its threats (its "worst" row; its only row with one threat), naming the threat that failed it.
    With `drift_gate`, also every output whose drift from the source (`drift_outputs`: relative mean absolute
    difference) exceeds `max_drift`, or its precision's DRIFT_TOLERANCE when None: a file that computes another
    function fails even where the test images' AP50 does not show it."""
    groups: Dict[str, List[Dict]] = {}
    for r in rows[1:]:
        groups.setdefault(r["backend"], []).append(r)
    failures = []
    for name, group in groups.items():
        r = next((g for g in group if g.get("threat") == "worst"), group[0])
        which = r.get("worst_threat") or {}

        def under(key):
            if key in ("clean", "misses_clean"):
                return "clean images, the same under every threat"
            return f"under the {which.get(key, r.get('threat') or 'transfer')} threat"

        for key in [k for k in r if k.startswith("drop_")]:
            ap = key.replace("drop_", "")
            if r[key] > max_drop:
                failures.append(f"{name}: {ap} lower by {r[key]:.4f} > {max_drop} ({under(ap)})")
        if max_misses is not None:
            for key in ("misses_clean", "misses_adv"):
                v = r.get(key)
                if v is not None and v > max_misses:
                    what = "clean" if key == "misses_clean" else "adversarial"
                    failures.append(f"{name}: deployment-only misses: {v:.1%} of the objects the source detects on "
                                    f"{what} images > {max_misses:.1%} ({under(key)})")
        tol = drift_tolerance(r.get("precision"), max_drift, model) if drift_gate else None
        if tol is not None:
            for out, per in (r.get("drift_outputs") or {}).items():
                for kind, v in per.items():
                    if not v <= tol:
                        failures.append(f"{name}: output {out} drifts from the source's by {v:.3g} (mean |difference|"
                                        f" / mean |source|) on {'clean' if kind == 'clean' else 'adversarial'} "
                                        f"images > {tol:g} (--max-drift, {r.get('precision')})")
    return failures
