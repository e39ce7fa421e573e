"""One attack loop for training and evaluation, on any Detector: an attack is an *objective* (what to maximise:
`attack_objectives.py`) x a *step rule* (`SignStep`: PGD's fixed sign step; `APGDStep`: Croce & Hein's adaptive
step with momentum) x a *budget* (eps, iterations, restarts, random start). `run_attack` runs any combination;
the paper's PGD-k is `DetectionLoss` x `SignStep(eps / k)` x `Budget(eps, k)` (`pgd_attack`).

Every iterate stays in the eps-ball around the clean images and in [0, 1]: PGD through the fused sign-step kernel
(`projected_sign_step`), APGD through the fused APGD step (`apgd_step`). Attack steps never update BatchNorm
running statistics (BN runs in eval mode whatever the model's mode) and never leave gradients in the parameters.

Per-image independence: with a per-image objective (evaluation) every image's gradient, step sizes, random start
and best point depend on that image alone, so results do not change with the batch size; training uses the
batch's loss (`DetectionLoss(per_image=False)`), exactly as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import cuda_kernels


def projected_sign_step(x_adv: torch.Tensor, grad: torch.Tensor, x_clean: torch.Tensor, step: float,
                        eps: float) -> torch.Tensor:
    """In place: x_adv <- clamp(clamp(x_adv + step * sign(grad), x_clean - eps, x_clean + eps), 0, 1)."""
    return cuda_kernels.sign_step_(x_adv, grad, x_clean, step, eps, 0.0, 1.0)


def apgd_step(x, x_prev, grad, x_clean, step: float, eps: float, momentum: float = 0.75) -> torch.Tensor:
    """APGD's momentum step and its projection onto the eps-ball and [0, 1], one fused op (cuda_kernels.apgd_step)."""
    return cuda_kernels.apgd_step(x, x_prev, grad, x_clean, step, eps, momentum, 0.0, 1.0)


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """BatchNorm layers in eval mode (running statistics used, not updated); other modules keep their mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    try:
        for m in bns:
            m.eval()
        yield
    finally:
        for m, was in zip(bns, modes):
            m.train(was)


def detection_loss(model, images, targets, keys: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The batch's detection loss (training's: batch normalisers), all terms or only `keys`."""
    losses, _ = model.forward_train(images, targets)
    return sum(v for k, v in losses.items() if keys is None or k in keys)


def input_gradient(model, images, targets, keys=None) -> torch.Tensor:
    """d loss / d images, with no gradient left in the parameters."""
    x = images.detach().requires_grad_(True)
    loss = detection_loss(model, x, targets, keys)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


# ---------------------------------------------------------------------------------------------- budget, start


@dataclass
class Budget:
    """eps (L-inf, [0, 1] pixel units), iterations = gradient evaluations per restart, restarts (random starts run
    as one batch, best per image kept), random start (uniform in the ball; always on with restarts > 1)."""

    eps: float
    iterations: int
    restarts: int = 1
    random_start: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 0 or self.eps < 0 or self.restarts < 1:
            raise ValueError(f"attack budget: iterations ({self.iterations}) and eps ({self.eps}) must be >= 0, "
                             f"restarts ({self.restarts}) >= 1")


#: relative margin by which a loss must exceed another to count as larger in every decision an attack or the worst
#: case takes (APGD's "did the loss increase", "is this the best point", the best restart, the worst-case
#: candidate). float32 forwards of a batch and of one image differ by about 1e-7 relative (another summation order),
#: and a strict '>' turned that last bit into another step-size schedule; differences below this margin are ties,
#: resolved towards the earlier point, so they no longer depend on --batch-size.
TIE_MARGIN = 1e-5


def clearly_greater(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a > b by more than TIE_MARGIN relative (absolute below magnitude 1); -inf in b is always beaten."""
    margin = torch.where(torch.isfinite(b), TIE_MARGIN * b.abs().clamp_min(1.0), torch.zeros_like(b))
    return a > b + margin


def _image_seed(seed: int, key, restart: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}|{restart}".encode()).digest()[:7], "little")


def start_points(x_clean: torch.Tensor, budget: Budget, keys: Sequence, restart_of: Sequence[int],
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The first iterate: the clean images, or a uniform draw in the eps-ball clipped to [0, 1]. Each image draws
    from its own generator, seeded by (budget seed, its key, its restart): the same start whatever the batch."""
    if not (budget.random_start or budget.restarts > 1) or budget.eps == 0:
        return x_clean.clone()
    if generator is not None:  # one draw for the whole batch (pgd_attack's historical behaviour)
        noise = torch.rand(x_clean.shape, generator=generator, device="cpu").to(x_clean)
    else:
        noise = torch.stack([torch.rand(x_clean.shape[1:], generator=torch.Generator().manual_seed(
            _image_seed(budget.seed, k, r))) for k, r in zip(keys, restart_of)]).to(x_clean)
    return (x_clean + budget.eps * (noise * 2 - 1)).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------- step rules


class SignStep:
    """PGD: x <- P(x + step * sign(grad)) with a fixed step (default eps / iterations, the paper's protocol)."""

    name = "sign"

    def __init__(self, step_size: Optional[float] = None):
        self.step_size = step_size

    def start(self, x, x_clean, budget: Budget) -> dict:
        step = budget.eps / max(budget.iterations, 1) if self.step_size is None else self.step_size
        return {"x_clean": x_clean, "eps": budget.eps, "step": step}

    def update(self, st: dict, t: int, x, values, grad):
        return projected_sign_step(x, grad, st["x_clean"], st["step"], st["eps"])

    def finish(self, st: dict, x, evaluate):
        return x, None


def apgd_checkpoints(iterations: int) -> List[int]:
    """Croce & Hein's checkpoints w_j = ceil(p_j * N_iter): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in exact hundredths (0.22 + 0.19 + ... would round 0.70 * 20 to
    14.000000000000002 and its ceiling to 15); only those in 1 .. N_iter - 1 (a check needs a step after it)."""
    p = [0, 22]
    while p[-1] <= 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    w = sorted({-(-pj * iterations // 100) for pj in p})
    return [x for x in w if 0 < x < iterations]


class APGDStep:
    """APGD (Croce & Hein, ICML 2020, L-inf): per image, step size eta starting at 2 eps;
        z = P(x_k + eta sign(grad f(x_k))),  x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})),  a = 0.75
    (the first step without momentum); at each checkpoint w_j eta is halved, and the next step taken from the best
    point x_max with its gradient, when
        1. the loss increased at fewer than rho = 0.75 of the steps since w_{j-1}, or
        2. eta was not halved at w_{j-1} and the best loss has not improved since w_{j-1}.
    Returns per image the best point and loss. Choices where the paper leaves it open, against the reference code
    (fra31/auto-attack): the paper's strict '<' in condition 1 (the code has '<='); condition 2 live at the first
    checkpoint, with w_0 = 0 (the code skips it there); after a restart the momentum term is zero (x_{k-1} := x_max;
    the code keeps the abandoned iterate); the loss sequence of condition 1 continues from f(x_max) after a restart.
    """

    name = "apgd"

    def __init__(self, momentum: float = 0.75, rho: float = 0.75, initial_step: float = 2.0,
                 record: bool = False):
        self.momentum, self.rho, self.initial_step, self.record = momentum, rho, initial_step, record

    def start(self, x, x_clean, budget: Budget) -> dict:
        n = x.shape[0]
        return {"x_clean": x_clean, "eps": budget.eps, "iterations": budget.iterations,
                "checkpoints": set(apgd_checkpoints(budget.iterations)), "last_w": 0,
                "eta": torch.full((n,), self.initial_step * budget.eps, dtype=torch.float64),
                "x_prev": None, "x_best": None, "f_best": None, "g_best": None, "f_prev": None,
                "n_up": torch.zeros(n, dtype=torch.int64), "halved_last": torch.zeros(n, dtype=torch.bool),
                "f_best_last": None, "trace": [] if self.record else None}

    @staticmethod
    def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))

    def update(self, st: dict, t: int, x, values, grad):
        f = values.detach().to(torch.float64).cpu()
        if t == 0:
            st["x_best"], st["f_best"], st["g_best"] = x.clone(), f.clone(), grad.clone()
            st["f_best_last"] = f.clone()
        else:
            st["n_up"] += clearly_greater(f, st["f_prev"]).long()
            better = clearly_greater(f, st["f_best"])
            m = self._rows(better, x)
            st["x_best"] = torch.where(m, x, st["x_best"])
            st["g_best"] = torch.where(m, grad, st["g_best"])
            st["f_best"] = torch.where(better, f, st["f_best"])
        st["f_prev"] = f
        halve = torch.zeros_like(st["halved_last"])
        if t in st["checkpoints"]:
            span = t - st["last_w"]
            cond1 = st["n_up"].double() < self.rho * span
            cond2 = ~st["halved_last"] & (st["f_best"] == st["f_best_last"])
            halve = cond1 | cond2
            if halve.any():
                st["eta"] = torch.where(halve, st["eta"] / 2, st["eta"])
                m = self._rows(halve, x)
                x = torch.where(m, st["x_best"], x)
                grad = torch.where(m, st["g_best"], grad)
                st["x_prev"] = torch.where(m, st["x_best"], st["x_prev"])
                st["f_prev"] = torch.where(halve, st["f_best"], st["f_prev"])
            st["halved_last"], st["f_best_last"] = halve, st["f_best"].clone()
            st["n_up"].zero_()
            st["last_w"] = t
        if st["trace"] is not None:
            st["trace"].append({"t": t, "loss": f.tolist(), "eta": st["eta"].tolist(), "halved": halve.tolist()})
        momentum = 1.0 if t == 0 else self.momentum
        x_new = _apgd_update(x, x if t == 0 else st["x_prev"], grad, st["x_clean"], st["eta"], st["eps"], momentum)
        st["x_prev"] = x
        return x_new

    def finish(self, st: dict, x, evaluate):
        """The last iterate's loss (one forward, no gradient), then the best point per image."""
        if st["f_best"] is None:  # no iteration ran
            return x, evaluate(x).detach().to(torch.float64).cpu()
        f = evaluate(x).detach().to(torch.float64).cpu()
        better = clearly_greater(f, st["f_best"])
        x_best = torch.where(self._rows(better, x), x, st["x_best"])
        f_best = torch.where(better, f, st["f_best"])
        if st["trace"] is not None:
            st["trace"].append({"t": st["iterations"], "loss": f.tolist(), "eta": st["eta"].tolist(),
                                "halved": [False] * len(f)})
        return x_best, f_best


def _apgd_update(x, x_prev, grad, x_clean, eta: torch.Tensor, eps: float, momentum: float) -> torch.Tensor:
    """The fused APGD step with a step size per image: one call per distinct step size (they are 2 eps / 2^k,
    so a few calls at most)."""
    values = torch.unique(eta)
    if len(values) == 1:
        return apgd_step(x, x_prev, grad, x_clean, float(values[0]), eps, momentum)
    out = torch.empty_like(x)
    for v in values:
        idx = torch.where(eta == v)[0].to(x.device)
        out[idx] = apgd_step(x[idx], x_prev[idx], grad[idx], x_clean[idx], float(v), eps, momentum)
    return out


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class AttackResult:
    images: torch.Tensor  # [N, 3, H, W] adversarial images (best restart per image)
    values: Optional[torch.Tensor] = None  # [N] objective value at them, when the step rule or restarts know it
    trace: Optional[list] = None  # APGDStep(record=True): per iteration, loss, step sizes, halvings
    extra: Dict = field(default_factory=dict)


def _value_and_grad(objective, model, x, ctx):
    xg = x.detach().requires_grad_(True)
    v = objective(model, xg, ctx)
    total = v.sum() if v.dim() else v
    if not total.requires_grad:  # nothing depends on the images (e.g. no object to attack in the batch)
        return v.detach(), torch.zeros_like(xg)
    (grad,) = torch.autograd.grad(total, xg, allow_unused=True)
    return v.detach(), torch.zeros_like(xg) if grad is None else grad


def clean_gradient(model, objective, images: torch.Tensor, targets=None):
    """(the objective's prepared context, its input gradient at the clean images), BatchNorm frozen, no gradient
    left in the parameters: the start of every clean-start attack on this objective, so several such attacks (the
    paper's PGD-1/3/5/10) can share one computation through `run_attack(ctx=..., first_grad=...)`."""
    x = images.detach()
    with frozen_batchnorm(model):
        with torch.no_grad():
            ctx = objective.prepare(model, x, targets)
        with torch.enable_grad():
            return ctx, _value_and_grad(objective, model, x, ctx)[1]


def _masked(x: torch.Tensor, x_clean: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else torch.where(mask, x, x_clean)


def run_attack(model, objective, rule, budget: Budget, images: torch.Tensor, targets=None,
               image_keys: Optional[Sequence] = None, first_grad: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, ctx=None,
               mask: Optional[torch.Tensor] = None) -> AttackResult:
    """Maximise `objective` from `images` within `budget` with `rule`. Restarts run as one batch of N x R images;
    per image the restart with the highest objective value is kept. `image_keys` (e.g. dataset image ids) seed each
    image's random starts (default: the position in the batch). `first_grad`: the first iteration's input gradient,
    already computed by the caller (training's gradient reuse); `ctx`: `objective.prepare`'s context for `images`,
    when the caller has it (`clean_gradient` returns both). `mask` ([N, 1, H, W] bool, e.g.
    `data.transforms.content_mask`): the pixels the attacker may change; every other pixel stays clean at every
    iterate (the letterbox padding the pipeline adds). `images` is not modified."""
    n = images.shape[0]
    x_clean = images.detach()
    keys = list(range(n)) if image_keys is None else list(image_keys)
    with frozen_batchnorm(model):
        with torch.no_grad():
            if ctx is None:
                ctx = objective.prepare(model, x_clean, targets)
        r = budget.restarts
        if r > 1:
            if first_grad is not None:
                raise ValueError("run_attack: first_grad is for a single start")
            x_clean = x_clean.repeat(r, 1, 1, 1)
            ctx = objective.repeat(ctx, r)
        restart_of = [i // n for i in range(n * r)]
        if mask is not None:
            mask = mask.to(x_clean.device).bool().repeat(r, 1, 1, 1)
        x = _masked(start_points(x_clean, budget, keys * r, restart_of, generator), x_clean, mask)
        st = rule.start(x, x_clean, budget)
        with torch.enable_grad():  # callers may be under no_grad
            for t in range(budget.iterations):
                if t == 0 and first_grad is not None:
                    values, grad = None, first_grad
                else:
                    values, grad = _value_and_grad(objective, model, x, ctx)
                x = _masked(rule.update(st, t, x, values, grad), x_clean, mask)

        def evaluate(xx):
            with torch.no_grad():
                return objective(model, xx, ctx)

        x, values = rule.finish(st, x, evaluate)
        if r > 1:
            if values is None:
                values = evaluate(x).detach().to(torch.float64).cpu()
            best = best_restart(values.view(r, n))
            rows = best * n + torch.arange(n)
            x, values = x[rows.to(x.device)], values[rows]
    return AttackResult(x, values, st.get("trace"))


def best_restart(values: torch.Tensor) -> torch.Tensor:
    """[R, N] objective values -> [N] index of each image's best restart: the earliest one that no later restart
    beats by more than the tie margin (`clearly_greater`)."""
    best = torch.zeros(values.shape[1], dtype=torch.long)
    top = values[0].clone()
    for r in range(1, values.shape[0]):
        better = clearly_greater(values[r], top)
        best = torch.where(better, torch.full_like(best, r), best)
        top = torch.where(better, values[r], top)
    return best


# ---------------------------------------------------------------------------------------------- named attacks


def pgd_attack(model, images: torch.Tensor, targets, eps: float, steps: int, step_size: Optional[float] = None,
               random_start: bool = False, generator: Optional[torch.Generator] = None,
               loss_keys: Optional[Sequence[str]] = None, first_grad: Optional[torch.Tensor] = None,
               per_image: bool = False, image_keys: Optional[Sequence] = None,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PGD-k against the detection loss on ground truth (or only the `loss_keys` terms: one TOD domain).
    `step_size` defaults to eps / steps (the paper's evaluation protocol). `per_image=True` maximises the sum of
    each image's own loss (evaluation: independent of the batch); False, the batch's loss (training).
    `first_grad`: the first iteration's input gradient from the caller (gradient reuse in training); `mask`: the
    pixels it may change (`run_attack`). Returns new adversarial images; `images` is not modified."""
    from .attack_objectives import DetectionLoss

    if steps < 0 or eps < 0:
        raise ValueError(f"pgd_attack: steps ({steps}) and eps ({eps}) must be >= 0")
    budget = Budget(eps, steps, random_start=random_start)
    return run_attack(model, DetectionLoss(loss_keys, per_image), SignStep(step_size), budget, images, targets,
                      image_keys=image_keys, first_grad=first_grad, generator=generator, mask=mask).images


def apgd_attack(model, images, targets, eps: float, iterations: int = 20, restarts: int = 1, seed: int = 0,
                loss_keys=None, image_keys=None, record: bool = False, mask=None) -> AttackResult:
    """APGD with `restarts` random starts on each image's own detection loss; best point per image."""
    from .attack_objectives import DetectionLoss

    return run_attack(model, DetectionLoss(loss_keys, per_image=True), APGDStep(record=record),
                      Budget(eps, iterations, restarts, random_start=True, seed=seed), images, targets,
                      image_keys=image_keys, mask=mask)


def per_image_losses(model, images, targets) -> torch.Tensor:
    """[N] total detection loss of each image alone (the Detector's `loss_terms_per_image`, summed)."""
    return sum(model.loss_terms_per_image(images, targets).values())


def choose_larger_loss(model, targets, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the candidate with the larger total detection loss (no gradient, BatchNorm frozen)."""
    with torch.no_grad(), frozen_batchnorm(model):
        scores = torch.stack([per_image_losses(model, c, targets) for c in candidates])
    pick = scores.argmax(0)  # [N]
    return torch.stack([candidates[int(p)][i] for i, p in enumerate(pick)])


def tod_attack(model, images: torch.Tensor, targets, eps: float, steps: int, step_size: Optional[float] = None,
               first_domain_grads: Optional[Dict[str, torch.Tensor]] = None,
               start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Task-oriented-domain PGD (training): at each step one candidate from each loss domain's gradient
    (classification, localization: the model's `loss_domains`), keeping per image the candidate with the larger
    total loss. Gradients of the batch's loss, as training's other attacks. `start`: the first iterate (a random
    start in the ball, `start_points`); the clean images by default. `first_domain_grads` are the gradients at the
    clean images, so they apply only to a clean start."""
    step_size = eps / max(steps, 1) if step_size is None else step_size
    x_clean = images.detach()
    if start is not None and first_domain_grads is not None:
        raise ValueError("tod_attack: first_domain_grads are the clean images' gradients; not for a random start")
    x_adv = x_clean.clone() if start is None else start.detach().clone()
    with frozen_batchnorm(model), torch.enable_grad():
        for i in range(steps):
            candidates = []
            for dom, keys in sorted(model.loss_domains.items()):
                if i == 0 and first_domain_grads is not None:
                    grad = first_domain_grads[dom]
                else:
                    grad = input_gradient(model, x_adv, targets, keys)
                c = x_adv.clone()
                projected_sign_step(c, grad, x_clean, step_size, eps)
                candidates.append(c)
            x_adv = choose_larger_loss(model, targets, candidates)
    return x_adv


# ---------------------------------------------------------------------------------------------- gradient-free


def uniform_noise(images: torch.Tensor, eps: float, seed: int = 0,
                  image_keys: Optional[Sequence] = None) -> torch.Tensor:
    """Uniform random noise in the L-inf ball: clamp(x + eps * u, 0, 1), u ~ U[-1, 1] per pixel, each image from its
    own generator seeded by (seed, "uniform-noise", its key): the same draw whatever the batch, and not the draw of
    any attack's random start (those use the bare key). `images` is not modified."""
    keys = list(range(images.shape[0])) if image_keys is None else list(image_keys)
    noise = torch.stack([torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(
        _image_seed(seed, f"uniform-noise|{k}", 0))) for k in keys]).to(images)
    return (images.detach() + eps * (noise * 2 - 1)).clamp_(0, 1)


SQUARE_P_INIT = 0.05  # Square attack's initial fraction of pixels per square (its L-inf setting)
SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10000 queries, rescaled to the budget


def square_fraction(query: int, queries: int, p_init: float = SQUARE_P_INIT) -> float:
    """The fraction of the image a square covers at `query` of `queries`: p_init, halved at each of Square
    attack's points (10, 50, 200, ... of 10000 queries) rescaled to the budget."""
    at = int(query / max(queries, 1) * 10000)
    return p_init / 2 ** sum(at > b for b in SQUARE_HALVINGS)


def square_attack(model, images: torch.Tensor, targets, eps: float, queries: int = 100, seed: int = 0,
                  image_keys: Optional[Sequence] = None, objective=None,
                  mask: Optional[torch.Tensor] = None) -> AttackResult:
    """Gradient-free random search on each image's own loss (after Square attack, Andriushchenko et al., ECCV 2020,
    L-inf): the perturbation starts as vertical stripes of +-eps (one sign per column and channel); each further
    query sets one square window to +-eps (one sign per channel) and keeps it when the image's loss rises. The
    square's side follows Square attack's schedule (sqrt(p H W), p from 0.05 halving as the queries run out).

    `queries` loss evaluations per image (forward passes, no backward), the stripes included. Every image draws its
    stripes, windows and signs from its own generator seeded by (seed, "square", its key), and a candidate is kept
    only when its loss exceeds the best by more than the tie margin (`clearly_greater`): a float32 difference
    between batch sizes (~1e-7 relative) cannot turn a decision, so the result does not depend on the batch. The iterate is
    always clamp(clean + delta, 0, 1) with every |delta| = eps: inside the ball and in [0, 1]. Objective: the
    per-image detection loss on `targets` (or `objective`); `mask`: the pixels it may change (`run_attack`).
    Returns the best point per image and its loss."""
    from .attack_objectives import DetectionLoss

    if queries < 1 or eps < 0:
        raise ValueError(f"square_attack: queries ({queries}) must be >= 1 and eps ({eps}) >= 0")
    objective = DetectionLoss(per_image=True) if objective is None else objective
    n, c, h, w = images.shape
    keys = list(range(n)) if image_keys is None else list(image_keys)
    x_clean = images.detach()
    gens = [torch.Generator().manual_seed(_image_seed(seed, f"square|{k}", 0)) for k in keys]
    stripes = torch.stack([(torch.randint(0, 2, (c, 1, w), generator=g) * 2 - 1).expand(c, h, w) for g in gens])
    if mask is not None:
        mask = mask.to(x_clean.device).bool()
    x = _masked((x_clean + eps * stripes.to(x_clean)).clamp_(0, 1), x_clean, mask)
    with torch.no_grad(), frozen_batchnorm(model):
        ctx = objective.prepare(model, x_clean, targets)
        f_best = objective(model, x, ctx).to(torch.float64).cpu()
        for q in range(1, queries):
            side = min(max(int(round(math.sqrt(square_fraction(q, queries) * h * w))), 1), h, w)
            cand = x.clone()
            for i, g in enumerate(gens):
                top = int(torch.randint(0, h - side + 1, (1,), generator=g))
                left = int(torch.randint(0, w - side + 1, (1,), generator=g))
                sign = (torch.randint(0, 2, (c, 1, 1), generator=g) * 2 - 1).to(x_clean)
                win = (slice(None), slice(top, top + side), slice(left, left + side))
                new = (x_clean[i][win] + eps * sign).clamp(0, 1)
                if torch.equal(new, x[i][win]):  # the window already holds these signs: take the opposite ones
                    new = (x_clean[i][win] - eps * sign).clamp(0, 1)
                cand[i][win] = new
            cand = _masked(cand, x_clean, mask)
            f = objective(model, cand, ctx).to(torch.float64).cpu()
            better = clearly_greater(f, f_best)
            x = torch.where(better.to(x.device).view(-1, 1, 1, 1), cand, x)
            f_best = torch.where(better, f, f_best)
    return AttackResult(x, f_best, extra={"queries": queries})
