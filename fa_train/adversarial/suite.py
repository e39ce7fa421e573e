"""The named attacks of `fa-bench --attack` (each an objective x step rule x budget of `attacks.run_attack`), the
suite, the per-image worst case over attacks, and what TOG's attacks do to the detections.

| name | objective | step rule | budget |
| --- | --- | --- | --- |
| pgd (PGD-k for each k of --steps) | detection loss on ground truth | sign step eps/k | k iterations, clean start |
| cls / loc | one TOD domain of the loss | sign step eps/k | k iterations, clean start |
| apgd | detection loss on ground truth | APGD | --apgd-iterations x --restarts random starts |
| tog-vanishing / -fabrication / -mislabel / -untargeted | TOG's objectives | sign step eps/4 (TOG's 2/255 at 8/255) | 10 iterations, random start |
| cwa | class-wise loss | APGD | --apgd-iterations, random start |
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .attack_objectives import (ClassWise, DetectionLoss, TogFabrication, TogMislabel, TogUntargeted,
                                TogVanishing)
from .attacks import (APGDStep, AttackResult, Budget, SignStep, clean_gradient, clearly_greater, frozen_batchnorm,
                      per_image_losses, run_attack)

PAPER_ROW_ATTACKS = ("pgd", "cls", "loc")
TOG_ATTACKS = ("tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted")
ATTACKS = PAPER_ROW_ATTACKS + ("apgd",) + TOG_ATTACKS + ("cwa",)
SUITE = ("pgd", "apgd") + TOG_ATTACKS + ("cwa",)
TOG_ITERATIONS = 10
TOG_STEP_FRACTION = 0.25  # TOG's eps_iter / eps = (2/255) / (8/255)


def parse_attacks(spec) -> Tuple[str, ...]:
    """'pgd' | 'suite' | 'pgd,apgd,cwa' | 'none' -> attack names in a fixed order; ValueError naming the problem."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p and p.strip()]
    if not parts:
        raise ValueError("no attack given")
    if "none" in parts:
        if len(parts) > 1:
            raise ValueError("'none' cannot be combined with attacks")
        return ("none",)
    names = []
    for p in parts:
        for name in (SUITE if p == "suite" else (p,)):
            if name not in ATTACKS:
                raise ValueError(f"{name!r}: unknown attack; available: {', '.join(ATTACKS)}, suite, none")
            if name not in names:
                names.append(name)
    rows = [n for n in names if n in PAPER_ROW_ATTACKS]
    if len(rows) > 1:
        raise ValueError(f"{' and '.join(rows)}: only one of pgd, cls, loc per run (they share the PGD-k columns)")
    return tuple(sorted(names, key=ATTACKS.index))


@dataclass
class AttackSettings:
    eps: float = 0.03
    steps: Tuple[int, ...] = (1, 3, 5, 10)
    apgd_iterations: int = 20
    restarts: int = 1
    tog_score: float = 0.5
    seed: int = 0


@dataclass
class Column:
    """One adversarial image set: its column name, the attack it belongs to, and objective x rule x budget."""

    column: str
    attack: str
    objective: object
    rule: object
    budget: Budget
    ground_truth_values: bool = False  # the values run_attack returns are the ground-truth loss itself

    @property
    def passes(self) -> float:
        """Forward/backward passes it costs (a forward alone counted as 1/3)."""
        b = self.budget
        p = b.iterations * b.restarts
        if isinstance(self.rule, APGDStep) or b.restarts > 1:
            p += b.restarts / 3  # the last iterate's loss
        if isinstance(self.objective, TogUntargeted):
            p += 1 / 3  # the clean detections
        return p


def attack_seed(seed: int, attack: str) -> int:
    """The random-start seed of one attack: every attack of the suite starts each image from its own draw (the
    worst case over attacks draws on as many starts as there are randomly started attacks)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{attack}".encode()).digest()[:6], "little")


def attack_plan(model, names: Sequence[str], s: AttackSettings) -> List[Column]:
    cols = []
    for name in names:
        if name in PAPER_ROW_ATTACKS:
            keys = None if name == "pgd" else model.loss_domains[name]
            for k in s.steps:
                cols.append(Column(f"PGD-{k}", name, DetectionLoss(keys), SignStep(s.eps / k), Budget(s.eps, k)))
        elif name == "apgd":
            cols.append(Column("apgd", name, DetectionLoss(), APGDStep(),
                               Budget(s.eps, s.apgd_iterations, s.restarts, random_start=True,
                                      seed=attack_seed(s.seed, name)),
                               ground_truth_values=True))
        elif name == "cwa":
            cols.append(Column("cwa", name, ClassWise(), APGDStep(),
                               Budget(s.eps, s.apgd_iterations, 1, random_start=True,
                                      seed=attack_seed(s.seed, name))))
        else:
            obj = {"tog-vanishing": TogVanishing(), "tog-fabrication": TogFabrication(),
                   "tog-mislabel": TogMislabel(s.tog_score), "tog-untargeted": TogUntargeted(s.tog_score)}[name]
            cols.append(Column(name, name, obj, SignStep(TOG_STEP_FRACTION * s.eps),
                               Budget(s.eps, TOG_ITERATIONS, 1, random_start=True,
                                      seed=attack_seed(s.seed, name))))
    return cols


def ground_truth_losses(model, images, targets) -> torch.Tensor:
    """[N] each image's own detection loss on ground truth (no gradient, BatchNorm frozen): the worst case's key."""
    with torch.no_grad(), frozen_batchnorm(model):
        return per_image_losses(model, images, targets).detach().to(torch.float64).cpu()


def shared_start(col: Column) -> Optional[str]:
    """Columns with the same key take the same first gradient: a sign step from the clean images on the same
    objective (the paper's PGD-k rows of one attack; their step sizes differ, their first gradient does not)."""
    b = col.budget
    if (col.attack in PAPER_ROW_ATTACKS and isinstance(col.rule, SignStep) and not b.random_start
            and b.restarts == 1 and b.iterations > 0 and b.eps > 0):
        return col.attack
    return None


class ColumnRunner:
    """Runs columns of a plan on one batch. Columns that share a start (`shared_start`) prepare their objective and
    compute the input gradient at the clean images once: PGD-1/3/5/10 cost 16 forward/backward passes instead of
    19, with the very same images (tested). `run(col, objective)` may replace the column's objective (the harness's
    differential threat wraps it); one runner serves one model and one way of wrapping."""

    def __init__(self, model, images: torch.Tensor, targets, image_keys=None, mask=None):
        self.model, self.images, self.targets, self.image_keys, self.mask = model, images, targets, image_keys, mask
        self._start: Dict[str, tuple] = {}  # shared_start key -> (prepared context, clean gradient)

    def run(self, col: Column, objective=None) -> AttackResult:
        objective = col.objective if objective is None else objective
        key, ctx, first = shared_start(col), None, None
        if key is not None:
            if key not in self._start:
                self._start[key] = clean_gradient(self.model, objective, self.images, self.targets)
            ctx, first = self._start[key]
        return run_attack(self.model, objective, col.rule, col.budget, self.images, self.targets,
                          image_keys=self.image_keys, first_grad=first, ctx=ctx, mask=self.mask)


def candidates(model, images, targets, plan: Sequence[Column], image_keys=None, need_losses: bool = False,
               mask=None) -> Iterator[Tuple[Column, torch.Tensor, Optional[torch.Tensor]]]:
    """Per column of the plan: (column, adversarial images, [N] ground-truth loss at them when `need_losses`);
    `mask`: the pixels an attack may change (`run_attack`)."""
    runner = ColumnRunner(model, images, targets, image_keys, mask)
    for col in plan:
        res = runner.run(col)
        loss = None
        if need_losses:
            loss = res.values if (col.ground_truth_values and res.values is not None) else \
                ground_truth_losses(model, res.images, targets)
        yield col, res.images, loss


class WorstCase:
    """Per image, the candidate with the largest ground-truth detection loss over every attack's images
    (AutoAttack's per-example worst case, on the detection loss). `update` per column, `choice` at the end."""

    def __init__(self, n: int):
        self.loss = torch.full((n,), -float("inf"), dtype=torch.float64)
        self.source = [None] * n

    def update(self, column: str, loss: torch.Tensor) -> torch.Tensor:
        """Returns the [N] mask of images whose worst candidate is now `column`'s."""
        better = clearly_greater(loss.to(torch.float64), self.loss)  # ties go to the earlier column
        self.loss = torch.where(better, loss, self.loss)
        for i in torch.where(better)[0].tolist():
            self.source[i] = column
        return better


def worst_row(row: Dict[str, float], selected_ap: float, columns: Sequence[str]) -> Tuple[float, str]:
    """The worst-case AP50: the lowest of the loss-selected images' AP50 and every attack's own AP50 (each
    attack's image set is also a choice the per-image adversary has), so it is never above any single attack;
    returns (value, which assignment gave it)."""
    best, src = selected_ap, "per-image largest loss"
    for c in columns:
        if c in row and row[c] < best:
            best, src = row[c], c
    return best, src


# ---------------------------------------------------------------------------------------------- TOG effects


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torchvision

    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b))
    return torchvision.ops.box_iou(a.float().cpu(), b.float().cpu())


@dataclass
class TogEffects:
    """Confident clean detections (score >= threshold) against the adversarial image's: kept (same class at IoU
    >= 0.5), relabelled (only another class there), lost (nothing there); fabricated = adversarial detections
    matching no clean detection. Greedy one-to-one matching, clean detections in decreasing score."""

    clean: int = 0
    kept: int = 0
    lost: int = 0
    relabelled: int = 0
    fabricated: int = 0
    adversarial: int = 0

    def add(self, clean: dict, adv: dict, score_thres: float, iou_thres: float = 0.5) -> None:
        c_keep = clean["scores"].cpu() >= score_thres
        a_keep = adv["scores"].cpu() >= score_thres
        cb, cl, cs = clean["boxes"].cpu()[c_keep], clean["labels"].cpu()[c_keep], clean["scores"].cpu()[c_keep]
        ab, al = adv["boxes"].cpu()[a_keep], adv["labels"].cpu()[a_keep]
        iou = _iou(cb, ab)
        used = torch.zeros(len(ab), dtype=torch.bool)
        for i in torch.argsort(cs, descending=True).tolist():
            ok = (iou[i] >= iou_thres) & ~used if len(ab) else torch.zeros(0, dtype=torch.bool)
            same = ok & (al == cl[i])
            if same.any():
                j = int(torch.where(same, iou[i], torch.full_like(iou[i], -1)).argmax())
                self.kept += 1
            elif ok.any():
                j = int(torch.where(ok, iou[i], torch.full_like(iou[i], -1)).argmax())
                self.relabelled += 1
            else:
                self.lost += 1
                continue
            used[j] = True
        self.clean += len(cb)
        self.adversarial += len(ab)
        self.fabricated += int((~used).sum())

    def as_dict(self) -> Dict[str, int]:
        return {"clean": self.clean, "kept": self.kept, "lost": self.lost, "relabelled": self.relabelled,
                "fabricated": self.fabricated, "adversarial": self.adversarial}
