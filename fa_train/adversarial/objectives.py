"""Training objectives. Each objective's `step` runs the forward/backward passes of one training step and
returns the logged scalars; the optimizer step belongs to the training loop.

Equation (3) of the paper, with beta on SSFA and gamma on KDFA (the paper's code base names its flags the other
way round; here the flags say what they weigh: `--ssfa-weight` = beta, `--kdfa-weight` = gamma):

    (1 - alpha) * l(f(x + d), y) + alpha * l(f(x), y)
      + beta  * (1 - cos(pool(mid(x + d)), pool(mid(x))))         [SSFA, target detached]
      + gamma * (1 - cos(pool(mid(x + d)), pool(teacher_mid(x))))  [KDFA, teacher frozen, eval mode]

Gradient reuse: the first PGD iteration is the clean forward/backward. It puts alpha * grad(clean loss) into the
parameters, gives the attack its first input gradient, and gives SSFA its (detached) target. PGD-k training
therefore costs k + 1 forward/backward passes plus one no-grad teacher forward.

The inner attack (issue 22) is the evaluation's attack loop (`attacks.run_attack`) configured from the method's
settings: a budget eps with its own step size and an optional random start, a budget warm-up (eps and the step
rising linearly over the first optimizer steps), an objective (`det`: the whole detection loss, today's; `cls`,
`loc`: one TOD domain; `tog-vanishing`; `mix`: one of those drawn per batch from the seed; `max`: per image the
candidate with the largest detection loss), or Free adversarial training (Shafahi et al., NeurIPS 2019: each batch
replayed m times, one forward/backward per replay serving both the parameters and the perturbation, which is carried
across replays and batches). The alignment terms always take the clean features from the clean pass and the
adversarial ones from the final perturbation, whatever made it. With the defaults (PGD-1 at 0.01, step 0.01, clean
start, `det`, no warm-up, no replays) the step is exactly today's. Every random draw of a step comes from a generator
seeded by (run seed, epoch, batch, replay, rank), so a mid-epoch resume replays it exactly.
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import cuda_kernels

from .attacks import (Budget, SignStep, choose_larger_loss, pgd_attack, projected_sign_step, run_attack,
                      start_points, tod_attack)

METHODS = ("standard", "at", "tod", "kdfa", "ssfa", "fa")
# the inner attack's objectives (names as fa-bench's attacks: cls / loc are the TOD domains of the loss)
TRAIN_OBJECTIVES = ("det", "cls", "loc", "tog-vanishing")
OBJECTIVE_CHOICES = TRAIN_OBJECTIVES + ("mix", "max")


@dataclass
class StepInfo:
    """Where a training step is: `step` optimizer steps done before it (the warm-up's clock), the epoch (data pass),
    the batch within it, the Free AT replay of the batch, the process rank. Seeds the step's random draws."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    replay: int = 0
    rank: int = 0


def step_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded by the run seed and `parts` (e.g. "start", epoch, batch, replay, rank): independent of
    every other random stream of the run, so a resumed run draws the same values at the same step."""
    h = hashlib.sha256("|".join(map(str, (seed,) + parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:7], "little"))


def training_attack_objective(name: str, model):
    """The attack suite's objective behind a training objective name (batch objectives as training's loss)."""
    from .attack_objectives import DetectionLoss, TogVanishing

    if name == "det":
        return DetectionLoss(None, per_image=False)
    if name in ("cls", "loc"):
        return DetectionLoss(model.loss_domains[name], per_image=False)
    if name == "tog-vanishing":
        return TogVanishing()
    raise ValueError(f"training objective {name!r}: expected one of {', '.join(OBJECTIVE_CHOICES)}")


def data_passes(epochs: int, free_replays: int = 1) -> int:
    """Free AT replays each batch m times, so the run makes ceil(epochs / m) passes over the data: about the same
    number of optimizer steps as `epochs` epochs of standard training."""
    return max(1, -(-int(epochs) // max(1, int(free_replays))))


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


def _scalar_logs(total: torch.Tensor, losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    out = {"loss": float(total.detach())}
    out.update({k: float(v.detach()) for k, v in losses.items()})
    return out


class StandardObjective:
    """Clean training: the sum of the detector's loss terms."""

    name = "standard"

    def __init__(self, device):
        self.device = device

    def step(self, model, images, targets, scaler, amp: bool, info: Optional["StepInfo"] = None) -> Dict[str, float]:
        with _autocast(self.device, amp):
            losses, _ = model.forward_train(images, targets)
        total = sum(losses.values())
        logs = _scalar_logs(total, losses)
        if math.isfinite(logs["loss"]):
            scaler.scale(total).backward()
        return logs


def _pooled_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().mean((2, 3)), b.detach().float().mean((2, 3))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=cuda_kernels.EPS).mean())


class AdversarialObjective:
    """AT, TOD, KDFA, SSFA and FA (= KDFA + SSFA), all on equation (3) with gradient reuse."""

    def __init__(self, name: str, device, pgd_steps: int = 1, train_eps: float = 0.01,
                 step_size: Optional[float] = 0.01, alpha: float = 0.5, ssfa_weight: float = 0.0,
                 kdfa_weight: float = 0.0, teacher: Optional[torch.nn.Module] = None, random_start: bool = False,
                 objective: str = "det", free_replays: int = 1, eps_warmup_steps: int = 0, seed: int = 0):
        if pgd_steps < 1:
            raise ValueError(f"--pgd-steps must be >= 1, got {pgd_steps}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
        if objective not in OBJECTIVE_CHOICES:
            raise ValueError(f"--train-objective {objective!r}: expected one of {', '.join(OBJECTIVE_CHOICES)}")
        if free_replays < 1:
            raise ValueError(f"--free-replays must be >= 1, got {free_replays}")
        if name == "tod" and (objective != "det" or free_replays > 1):
            raise ValueError("--method tod: its attack is its own (one candidate per loss domain); it takes neither "
                             "--train-objective nor --free-replays")
        if free_replays > 1 and objective != "det":
            raise ValueError("--free-replays: Free AT ascends the training loss's own input gradient, so "
                             "--train-objective must be det")
        self.name, self.device = name, device
        self.steps, self.eps, self.alpha = pgd_steps, train_eps, alpha
        self.random_start, self.objective, self.free_replays = bool(random_start), objective, int(free_replays)
        self.eps_warmup_steps, self.seed = int(eps_warmup_steps), int(seed)
        if step_size is None:  # auto: Free AT steps eps (Shafahi et al.); PGD-k eps/k, 2.5 eps/k from a random start
            step_size = train_eps if free_replays > 1 else train_eps / pgd_steps * (2.5 if random_start else 1.0)
        self.step_size = step_size
        self.ssfa_weight, self.kdfa_weight = ssfa_weight, kdfa_weight
        self.tod = name == "tod"
        self.teacher = teacher
        self.delta: Optional[torch.Tensor] = None  # Free AT: the perturbation carried across replays and batches
        self.info: Optional[StepInfo] = None
        if kdfa_weight and teacher is None:
            raise ValueError("KDFA needs a teacher")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    # -- phase 1: the clean pass (first PGD iteration)
    def clean_pass(self, model, images, targets, scaler, amp):
        x = images.detach().clone().requires_grad_(True)
        with _autocast(self.device, amp):
            losses, mid = model.forward_train(x, targets)
        clean = sum(losses.values())
        domain_grads = None
        if self.tod:  # one input gradient per loss domain, from the same graph
            domain_grads = {}
            for dom, keys in model.loss_domains.items():
                part = sum(losses[k] for k in keys)
                (domain_grads[dom],) = torch.autograd.grad(part, x, retain_graph=True)
        if not math.isfinite(float(clean.detach())):
            return clean, mid.detach(), None, domain_grads
        if self.alpha > 0:
            scaler.scale(self.alpha * clean).backward()
            grad = x.grad  # = scale * alpha * d clean / dx: same sign
        else:
            (grad,) = torch.autograd.grad(clean, x)
        return clean, mid.detach(), grad, domain_grads

    def budget_at(self, step: int):
        """(eps, step size) of optimizer step `step` (0-based): the full budget, or during the warm-up both scaled
        by (step + 1) / warm-up steps."""
        if not self.eps_warmup_steps or step + 1 >= self.eps_warmup_steps:
            return self.eps, self.step_size
        f = (step + 1) / self.eps_warmup_steps
        return self.eps * f, self.step_size * f

    def objective_of(self, info: "StepInfo") -> str:
        """The objective of this step: the configured one, or for `mix` one drawn from the run seed, the epoch and
        the batch (the same on every rank and every replay)."""
        if self.objective != "mix":
            return self.objective
        g = step_generator(self.seed, "mix", info.epoch, info.batch)
        return TRAIN_OBJECTIVES[int(torch.randint(len(TRAIN_OBJECTIVES), (1,), generator=g))]

    def _generator(self, info: "StepInfo") -> torch.Generator:
        return step_generator(self.seed, "start", info.epoch, info.batch, info.replay, info.rank)

    def attack(self, model, x_clean, targets, first_grad, domain_grads, info: Optional["StepInfo"] = None):
        """The same attacks as evaluation, their first step from the clean pass's gradients where the attack starts
        at the clean images on the detection loss (the clean pass's own gradient)."""
        info = info or StepInfo()
        eps, step_size = self.budget_at(info.step)
        gen = self._generator(info) if self.random_start or self.objective == "max" else None
        if self.tod:
            if not self.random_start:
                return tod_attack(model, x_clean, targets, eps=eps, steps=self.steps, step_size=step_size,
                                  first_domain_grads=domain_grads)
            start = start_points(x_clean, Budget(eps, self.steps, random_start=True), [], [], generator=gen)
            return tod_attack(model, x_clean, targets, eps=eps, steps=self.steps, step_size=step_size, start=start)
        name = self.objective_of(info)
        if name == "max":  # per image, the strongest candidate: the largest detection loss, as TOD chooses
            cands = [self._attack_one(n, model, x_clean, targets, first_grad, eps, step_size, gen)
                     for n in TRAIN_OBJECTIVES]
            return choose_larger_loss(model, targets, cands)
        return self._attack_one(name, model, x_clean, targets, first_grad, eps, step_size, gen)

    def _attack_one(self, name, model, x_clean, targets, first_grad, eps, step_size, gen):
        if name == "det":
            return pgd_attack(model, x_clean, targets, eps=eps, steps=self.steps, step_size=step_size,
                              random_start=self.random_start, generator=gen,
                              first_grad=None if self.random_start else first_grad)
        budget = Budget(eps, self.steps, random_start=self.random_start)
        return run_attack(model, training_attack_objective(name, model), SignStep(step_size), budget, x_clean,
                          targets, generator=gen).images

    def begin_step(self, info: StepInfo) -> None:
        """Where the next `step` is (the training loop says it before each step): seeds its draws, its budget."""
        self.info = info

    def step(self, model, images, targets, scaler, amp: bool, info: Optional[StepInfo] = None) -> Dict[str, float]:
        """One training step's passes; `info` (or the last `begin_step`'s) says where it is (default: step 0)."""
        info = info or self.info or StepInfo()
        if self.free_replays > 1:
            return self.free_step(model, images, targets, scaler, amp, info)
        x_clean = images.detach()
        if self.alpha == 0 and not self.ssfa_weight and self.random_start and not self.tod:
            # nothing needs the clean pass (no clean loss, no SSFA target, no first gradient from a random start):
            # PGD-k costs k + 1 passes instead of k + 2
            x_adv = self.attack(model, x_clean, targets, None, None, info)
            logs = self._adversarial_part(model, x_clean, x_adv, targets, None, torch.zeros(()), scaler, amp)
            logs.pop("clean")
            return logs
        clean, mid_clean, grad, domain_grads = self.clean_pass(model, x_clean, targets, scaler, amp)
        if grad is None:  # non-finite clean loss: nothing was back-propagated; the loop skips the step
            return {"loss": float("nan"), "clean": float(clean.detach())}
        x_adv = self.attack(model, x_clean, targets, grad, domain_grads, info)
        return self._adversarial_part(model, x_clean, x_adv, targets, mid_clean, clean, scaler, amp)

    def _adversarial_part(self, model, x_clean, x_adv, targets, mid_clean, clean, scaler, amp):
        """(1 - alpha) l(x_adv) + the alignment terms, back-propagated; the logs. The clean loss's share
        (alpha l(x)) is the caller's: already in the parameters' gradients, only added to the logged loss."""
        teacher_mid = None
        if self.kdfa_weight:
            with torch.no_grad(), _autocast(self.device, amp):
                teacher_mid = self.teacher.features(x_clean)
        with _autocast(self.device, amp):
            adv_losses, mid_adv = model.forward_train(x_adv, targets)
        adv = sum(adv_losses.values())
        total = (1.0 - self.alpha) * adv
        align_targets, align_weights = [], []
        if self.ssfa_weight:
            align_targets.append(mid_clean)
            align_weights.append(self.ssfa_weight)
        if self.kdfa_weight:
            align_targets.append(teacher_mid)
            align_weights.append(self.kdfa_weight)
        if align_targets:  # SSFA and KDFA together are one fused call
            total = total + cuda_kernels.pooled_cosine_loss(mid_adv.float(), [t.float() for t in align_targets],
                                                            align_weights)
        logs = {"adv": float(adv.detach()), "clean": float(clean.detach()),
                **{f"adv_{k}": float(v.detach()) for k, v in adv_losses.items()}}
        if self.ssfa_weight:
            c = _pooled_cos(mid_adv, mid_clean)
            logs.update(ssfa=self.ssfa_weight * (1 - c), cos_ssfa=c)
        if self.kdfa_weight:
            c = _pooled_cos(mid_adv, teacher_mid)
            logs.update(kdfa=self.kdfa_weight * (1 - c), cos_kdfa=c)
        logs["loss"] = float(total.detach()) + self.alpha * logs["clean"]  # alpha = 0 where no clean pass ran
        if math.isfinite(logs["loss"]):
            scaler.scale(total).backward()
        return logs

    # -- Free adversarial training
    def free_step(self, model, images, targets, scaler, amp: bool, info: StepInfo) -> Dict[str, float]:
        """One replay of Free AT: the images plus the carried perturbation, one forward/backward that gives the
        parameters their gradient and the perturbation its ascent step: delta <- P(delta + step * sign(grad_x)).
        The perturbation starts at zero (or uniform in the ball with --random-start) and is carried to the next
        replay and the next batch; a batch of another shape starts it afresh. With alpha > 0 the clean loss needs a
        clean pass of its own (one more forward/backward); with alpha = 0 and SSFA, a forward without gradient."""
        eps, step_size = self.budget_at(info.step)
        x_clean = images.detach()
        if self.delta is None or self.delta.shape != x_clean.shape:
            start = start_points(x_clean, Budget(eps, 1, random_start=self.random_start), [], [],
                                 generator=self._generator(info) if self.random_start else None)
            self.delta = start - x_clean
        x_adv = (x_clean + self.delta.to(x_clean).clamp(-eps, eps)).clamp(0, 1)
        clean, mid_clean = torch.zeros((), device=x_clean.device), None
        if self.alpha > 0:
            with _autocast(self.device, amp):
                losses, mid = model.forward_train(x_clean, targets)
            clean = sum(losses.values())
            if not math.isfinite(float(clean.detach())):
                return {"loss": float("nan"), "clean": float(clean.detach())}
            scaler.scale(self.alpha * clean).backward()
            mid_clean = mid.detach()
        elif self.ssfa_weight:
            with torch.no_grad(), _autocast(self.device, amp):
                _, mid_clean = model.forward_train(x_clean, targets)
        x_adv = x_adv.detach().requires_grad_(True)
        logs = self._adversarial_part(model, x_clean, x_adv, targets, mid_clean, clean, scaler, amp)
        if math.isfinite(logs["loss"]) and x_adv.grad is not None:
            x_new = x_adv.detach().clone()
            projected_sign_step(x_new, x_adv.grad, x_clean, step_size, eps)
            self.delta = (x_new - x_clean).detach()
        return logs

    def state_dict(self) -> dict:
        """What a checkpoint must keep for an exact resume: Free AT's carried perturbation."""
        return {"free_delta": None if self.delta is None else self.delta.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        d = (state or {}).get("free_delta")
        self.delta = None if d is None else d.to(self.device)


def _ultralytics_backbone(cfg: dict) -> dict:
    """What makes an Ultralytics YAML's layers up to the M-th: its backbone section and its scale's multipliers."""
    scale = (cfg.get("scales") or {}).get(cfg.get("scale"))
    mult = list(scale) if scale else [cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0),
                                      cfg.get("max_channels")]
    return {"backbone": cfg.get("backbone"), "depth, width, max_channels": mult, "activation": cfg.get("activation")}


def teacher_differences(student: dict, teacher: dict) -> list:
    """'what: student != teacher' for each architecture setting below the aligned M-th layer that differs between a
    student's and a KDFA teacher's `arch_config` (the class count and the layers above it may differ)."""
    out = []
    for k in ("backbone", "width_mult", "depth_mult"):
        if student.get(k) != teacher.get(k):
            out.append(f"{k}: {student.get(k)!r} here, {teacher.get(k)!r} in the teacher")
    a, b = student.get("cfg"), teacher.get("cfg")
    if isinstance(a, dict) and isinstance(b, dict):
        sa, sb = _ultralytics_backbone(a), _ultralytics_backbone(b)
        out += [f"YAML {k}: {sa[k]!r} here, {sb[k]!r} in the teacher" for k in sa if sa[k] != sb[k]]
    return out


def build_objective(cfg: dict, model, device, log=print, steps_per_epoch: int = 0):
    """The method's objective. `steps_per_epoch`: batches per data pass (the warm-up's epochs in optimizer steps);
    0 leaves the warm-up off."""
    m = cfg["method"]
    name = m.get("name", "standard")
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: unknown method; available: {', '.join(METHODS)}")
    if name == "standard":
        return StandardObjective(device)
    default_w = getattr(model, "default_alignment_weight", 1.0)
    ssfa_w = m.get("ssfa_weight") if m.get("ssfa_weight") is not None else default_w
    kdfa_w = m.get("kdfa_weight") if m.get("kdfa_weight") is not None else default_w
    ssfa_w = ssfa_w if name in ("ssfa", "fa") else 0.0
    kdfa_w = kdfa_w if name in ("kdfa", "fa") else 0.0
    teacher = None
    if kdfa_w:
        if m.get("teacher"):
            from ..models import load_model

            teacher, _ = load_model(m["teacher"])
            mine, theirs = model.arch_config(), teacher.arch_config()
            from ..checkpoint import CheckpointError

            if mine["name"] != theirs["name"] or teacher.mid_channels != model.mid_channels:
                raise CheckpointError(f"--teacher {m['teacher']}: a {theirs['name']} checkpoint (M-th layer "
                                      f"{teacher.mid_channels} channels) cannot teach a {mine['name']} model "
                                      f"({model.mid_channels} channels): KDFA aligns the same layer of the same "
                                      f"detector")
            differ = teacher_differences(mine, theirs)
            if differ:  # the same channel count, another network below the M-th layer (resnet18 / resnet34, ...)
                raise CheckpointError(f"--teacher {m['teacher']}: another {mine['name']} network than this run's "
                                      f"({'; '.join(differ)}): KDFA aligns the same layer of the same detector")
            teacher = teacher.to(device)
            log(f"KDFA teacher: {m['teacher']}")
        else:  # the paper: the clean-trained base model is both the initial weights and the teacher
            teacher = copy.deepcopy(model)
            log("KDFA teacher: the initial weights (pass --teacher to use another checkpoint)")
    step_size = m.get("step_size", 0.01)
    warm = float(m.get("eps_warmup_epochs") or 0)
    return AdversarialObjective(name, device, pgd_steps=int(m.get("pgd_steps", 1)),
                                train_eps=float(m.get("train_eps", 0.01)),
                                step_size=None if step_size is None else float(step_size),
                                alpha=float(m.get("alpha", 0.5)), ssfa_weight=float(ssfa_w),
                                kdfa_weight=float(kdfa_w), teacher=teacher,
                                random_start=bool(m.get("random_start", False)),
                                objective=m.get("objective") or "det", free_replays=int(m.get("free_replays") or 1),
                                eps_warmup_steps=int(round(warm * steps_per_epoch)),
                                seed=int(cfg.get("train", {}).get("seed", 0)))
