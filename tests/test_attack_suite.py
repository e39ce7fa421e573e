"""The attack loop (objective x step rule x budget): the paper's PGD pinned against the implementation it
replaced, per-image independence of batching for both detectors, APGD (schedule, strength, restarts), TOG and the
class-wise attack through the Detector contract, the worst case, fa-bench --attack lists and the harness."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_targets
from cuda_kernels.reference import apgd_step_ref
from fa_train.adversarial import attacks as A
from fa_train.adversarial.attack_objectives import (ClassWise, Objective, TogFabrication,
                                                    TogMislabel, TogUntargeted, TogVanishing)
from fa_train.adversarial.suite import (ATTACKS, SUITE, AttackSettings, TogEffects, WorstCase, attack_plan,
                                        parse_attacks, worst_row)
from fa_train.models import create_model

EPS = 0.03
FRCNN_TINY = dict(backbone="resnet18", fpn_channels=32, min_size=64, max_size=64)


def _frcnn():
    torch.manual_seed(0)
    return create_model("fasterrcnn_resnet50_fpn", 4, **FRCNN_TINY)


def _images(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 64, 64, generator=g, dtype=dtype)
    x[0, :, :8, :8] = 0.0  # pixels on the [0, 1] bounds
    x[-1, :, :8, :8] = 1.0
    return x


# ---------------------------------------------------------------------------------------------- the paper's PGD


def test_paper_rows_share_their_first_gradient_with_the_same_images(tiny_yolo):
    """ColumnRunner computes PGD-1/3/5/10's gradient at the clean images once (16 passes, not 19): the images are
    those of each row run alone, bit for bit, also through a wrapped objective; and the shared runs really take
    3 fewer gradient evaluations and prepare the objective once."""
    from fa_train.adversarial.attack_objectives import DetectionLoss
    from fa_train.adversarial.suite import ColumnRunner

    model = tiny_yolo.eval()
    x, t = _images(3), make_targets(3)
    plan = attack_plan(model, ("pgd",), AttackSettings(EPS, (1, 3, 5, 10)))
    calls = {"n": 0, "prepare": 0}

    class Counted(DetectionLoss):
        def prepare(self, m, images, targets):
            calls["prepare"] += 1
            return super().prepare(m, images, targets)

        def __call__(self, m, images, ctx):
            calls["n"] += images.requires_grad
            return super().__call__(m, images, ctx)

    runner = ColumnRunner(model, x, t, [10, 11, 12])
    for col in plan:
        alone = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=[10, 11, 12]).images
        shared = runner.run(col, Counted()).images
        assert torch.equal(shared, alone), col.column
        assert not torch.equal(alone, x)
    assert calls["n"] == 1 + 0 + 2 + 4 + 9  # the clean gradient once, then each row's later steps
    assert calls["prepare"] == 1  # and the objective prepared once for the four rows



def _old_pgd(model, images, targets, eps, steps, step_size):
    """The PGD loop this project had before the attack loop (commit 5b7af0e), verbatim in substance: the batch's
    detection loss from forward_train, the fused sign step, no random start."""
    x_clean = images.detach()
    x_adv = x_clean.clone()
    with A.frozen_batchnorm(model), torch.enable_grad():
        for _ in range(steps):
            x = x_adv.detach().requires_grad_(True)
            losses, _ = model.forward_train(x, targets)
            (grad,) = torch.autograd.grad(sum(losses.values()), x)
            A.projected_sign_step(x_adv, grad, x_clean, step_size, eps)
    return x_adv


def test_paper_pgd_is_the_old_implementation_bit_for_bit(tiny_yolo):
    """Training (batch loss) equals the old loop on a batch; evaluation (each image's own loss) equals the old loop
    run on each image alone, also when the images come as one batch."""
    model = tiny_yolo.eval()
    x, t = _images(3), make_targets(3)
    for k in (1, 3):
        old_batch = _old_pgd(model, x, t, EPS, k, EPS / k)
        assert torch.equal(A.pgd_attack(model, x, t, eps=EPS, steps=k), old_batch)
        old_single = torch.cat([_old_pgd(model, x[i:i + 1], t[i:i + 1], EPS, k, EPS / k) for i in range(3)])
        assert torch.equal(A.pgd_attack(model, x, t, eps=EPS, steps=k, per_image=True), old_single)
        assert not torch.equal(old_batch, old_single)  # the batch-coupled objective the evaluation had before


# ---------------------------------------------------------------------------------------------- every attack


def _plan(model, names=ATTACKS, iterations=3):
    return attack_plan(model, names, AttackSettings(EPS, (1, 2), iterations, 2, tog_score=0.0))


@pytest.mark.parametrize("arch", ["yolov3", "fasterrcnn"])
def test_every_attack_stays_in_the_ball_and_the_unit_box(arch, tiny_yolo):
    model = (tiny_yolo if arch == "yolov3" else _frcnn()).eval()
    x, t = _images(2), make_targets(2)
    for col in _plan(model):
        res = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=[7, 8])
        adv = res.images
        assert adv.shape == x.shape, col.column
        assert (adv - x).abs().max() <= EPS + 1e-6, col.column
        assert adv.min() >= 0 and adv.max() <= 1, col.column
        assert not torch.equal(adv, x), col.column
    assert all(p.grad is None for p in model.parameters())


def test_fused_apgd_step_matches_its_reference():
    torch.manual_seed(0)
    x, prev, c = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    g = torch.randn(2, 3, 8, 8)
    g[0, 0, 0] = 0.0
    y = A.apgd_step(x, prev, g, c, 0.05, 0.03, 0.75)
    ref = apgd_step_ref(x, prev, g, c, 0.05, 0.03, 0.75)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert ((y - c).abs() <= 0.03 + 1e-6).all() and y.min() >= 0 and y.max() <= 1
    # by hand: z = P(x + step sign g), y = P(x + 0.75 (z - x) + 0.25 (x - prev))
    proj = lambda v: torch.min(torch.max(v, c - 0.03), c + 0.03).clamp(0, 1)  # noqa: E731
    z = proj(x + 0.05 * torch.sign(g))
    torch.testing.assert_close(ref, proj(x + 0.75 * (z - x) + 0.25 * (x - prev)), rtol=0, atol=1e-6)
    torch.testing.assert_close(apgd_step_ref(x, prev, g, c, 0.05, 0.03, 1.0), z, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- per-image independence


@pytest.mark.parametrize("arch", ["yolov3", "fasterrcnn"])
def test_attack_results_do_not_depend_on_the_batch_size(arch, tiny_yolo):
    """Batch of 3 against one image at a time: same adversarial images for PGD, APGD with batched restarts and a
    TOG attack (float64, so that float reassociation cannot flip a gradient sign)."""
    model = (tiny_yolo if arch == "yolov3" else _frcnn()).eval().double()
    x, t = _images(3, torch.float64), make_targets(3)
    keys = [11, 12, 13]
    names = ("pgd", "apgd", "tog-untargeted", "cwa") if arch == "yolov3" else ("pgd", "apgd")
    for col in _plan(model, names, iterations=3):
        batch = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=keys)
        single = [A.run_attack(model, col.objective, col.rule, col.budget, x[i:i + 1], t[i:i + 1],
                               image_keys=keys[i:i + 1]) for i in range(3)]
        torch.testing.assert_close(batch.images, torch.cat([s.images for s in single]), rtol=0, atol=1e-9,
                                   msg=col.column)
        if batch.values is not None:
            torch.testing.assert_close(batch.values, torch.cat([s.values for s in single]), rtol=1e-9, atol=1e-9)


def test_frcnn_loss_terms_per_image_are_torchvisions_for_one_image():
    from fa_train.models.faster_rcnn import _seeded_sampling

    model = _frcnn().eval().double()
    x, t = _images(3, torch.float64), make_targets(3)
    per = model.loss_terms_per_image(x, t)
    for i in range(3):
        with _seeded_sampling(model.detector):
            tv, _ = model.forward_train(x[i:i + 1], t[i:i + 1])
        for k, v in tv.items():
            torch.testing.assert_close(per[k][i], v, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- APGD


class _Scripted(Objective):
    """A toy differentiable 'detector' objective: value = a scripted sequence of losses (one per call, per image),
    gradient = a fixed direction. Lets the step-size schedule be traced by hand."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def __call__(self, model, images, ctx):
        v = torch.tensor([s[self.calls] for s in self.script], dtype=images.dtype)
        self.calls += 1
        return v + 0.0 * images.flatten(1).sum(1) + images.flatten(1)[:, 0] * 1e-30


def test_apgd_checkpoints_are_the_papers():
    assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # p_j = 0.22, 0.41, 0.57, ...
    assert A.apgd_checkpoints(20) == [5, 9, 12, 14, 16, 18, 19]  # ceil(p_j * 20), exact hundredths


def test_apgd_step_size_schedule_against_a_hand_computed_trace():
    """N_iter = 20, checkpoints 5, 9, 12, 14, 16, 18, 19 (rho = 0.75). Image 0: the loss rises at every step: never
    halved. Image 1: flat after the start: condition 2 at 5 (eta 2e -> e), not at 9 (it was just halved) but
    condition 1 (0 rises of 4 < 3) halves at 9, ... every checkpoint halves (condition 1: 0 rises). Image 2:
    rises at steps 1, 2 and 4 of the first 5 (3 < 0.75 x 5 = 3.75: condition 1 halves at 5); restarted from the
    best point (loss 2.0), step 6 (2.0) is no rise, then every step rises: 3 of 4 to point 9 (not < 3), 3 of 3,
    ... never halved again."""
    n = 21  # 20 gradient evaluations + the last point's loss
    rising = [float(i) for i in range(n)]
    flat = [1.0] * n
    three_of_five = [0.0, 1.0, 2.0, 1.0, 1.5, 1.4] + [2.0 + i for i in range(n - 6)]
    obj = _Scripted([rising, flat, three_of_five])
    x = torch.full((3, 1, 2, 2), 0.5)
    res = A.run_attack(torch.nn.Identity(), obj, A.APGDStep(record=True), A.Budget(0.1, 20), x, [None] * 3)
    eta = {r["t"]: r["eta"] for r in res.trace}
    e2 = 0.2
    # image 0: never halved
    assert all(eta[t][0] == e2 for t in range(20))
    # image 1: halved at every checkpoint (5: condition 2 and 1; later: condition 1, no rise at all)
    expect1 = {4: e2, 5: e2 / 2, 8: e2 / 2, 9: e2 / 4, 12: e2 / 8, 14: e2 / 16, 16: e2 / 32, 18: e2 / 64,
               19: e2 / 128}
    for t, v in expect1.items():
        assert eta[t][1] == pytest.approx(v), t
    # image 2: halved at 5 only
    assert eta[4][2] == e2 and eta[5][2] == e2 / 2 and eta[19][2] == e2 / 2
    halved = {r["t"]: r["halved"] for r in res.trace}
    assert [t for t in range(20) if halved[t][0]] == []
    assert [t for t in range(20) if halved[t][1]] == [5, 9, 12, 14, 16, 18, 19]
    assert [t for t in range(20) if halved[t][2]] == [5]
    assert res.values.tolist() == [20.0, 1.0, max(three_of_five)]


def test_apgd_halving_restarts_from_the_best_point():
    """On a concave toy loss -|x - c|^2 the first step (2 eps) overshoots; after a halving the next iterate is
    taken from the best point seen."""
    c = torch.full((1, 1, 2, 2), 0.53)

    class Quad(Objective):
        def __call__(self, model, images, ctx):
            return -((images - c) ** 2).flatten(1).sum(1)

    x = torch.full((1, 1, 2, 2), 0.5)
    res = A.run_attack(torch.nn.Identity(), Quad(), A.APGDStep(record=True), A.Budget(0.05, 20), x, [None])
    assert res.values[0] > -((x - c) ** 2).sum()
    assert (res.images - c).abs().max() < 0.01  # converged near the maximum inside the ball
    etas = [r["eta"][0] for r in res.trace]
    assert etas[0] == pytest.approx(0.1) and etas[-1] < 0.1 / 4  # the step was halved repeatedly


def test_apgd_reaches_a_higher_loss_than_pgd_with_the_same_gradient_evaluations(overfit):
    """On a model whose loss answers its input: the overfit model on its own two images (the untrained tiny model's
    loss hardly moves within eps: both attacks raised it by ~1e-6 of its value, so which was higher was float32
    rounding, and flipped on an AVX-512 CPU). There APGD-10 beats PGD-10 by far more than rounding (measured:
    1.4-2.4x PGD's loss, PGD itself 10-20x the clean loss)."""
    from fa_train.models import load_model

    model, _ = load_model(str(overfit))
    model.eval()
    x, t, _ = _train_batch()
    k = 10
    pgd = A.pgd_attack(model, x, t, eps=EPS, steps=k, per_image=True)
    with torch.no_grad():
        l_pgd = A.per_image_losses(model, pgd, t)
        l_clean = A.per_image_losses(model, x, t)
    res = A.apgd_attack(model, x, t, EPS, iterations=k, image_keys=[0, 1])
    with torch.no_grad():
        l_apgd = A.per_image_losses(model, res.images, t)
    torch.testing.assert_close(l_apgd.double(), res.values, rtol=1e-5, atol=1e-5)
    assert (l_pgd > 1.2 * l_clean).all(), (l_pgd, l_clean)  # the loss answers the attack: not a flat comparison
    # APGD ahead of PGD on the pair (its momentum and step-size halving; a single image may tie or trail on a model
    # this small, so the sum is what is asserted)
    assert float(l_apgd.sum()) > float(l_pgd.sum()), (l_apgd, l_pgd)


def test_more_restarts_never_lower_any_images_best_loss(tiny_yolo):
    model = tiny_yolo.eval()
    x, t = _images(2), make_targets(2)
    one = A.apgd_attack(model, x, t, EPS, iterations=3, restarts=1, image_keys=[5, 6])
    three = A.apgd_attack(model, x, t, EPS, iterations=3, restarts=3, image_keys=[5, 6])
    assert (three.values >= one.values - 1e-6).all()


# ---------------------------------------------------------------------------------------------- TOG, class-wise


# `overfit` (conftest.py, shared by the session): a tiny YOLOv3 that has memorised two images, evaluated on the same
# two: confident detections to attack.


def _train_batch(n=2):
    from fa_train.data import build_dataset
    from fa_train.engine import make_loader

    ds = build_dataset("synth:60", "train", 64, split="shapes:train", max_images=n, log=None)
    images, targets, metas = next(iter(make_loader(ds, n, False, 0)))
    return images, targets, metas


def _count(dets, thres):
    return sum(int((d["scores"] >= thres).sum()) for d in dets)


def test_tog_attacks_do_what_they_aim_at(overfit):
    from fa_train.models import load_model

    model, _ = load_model(str(overfit))
    model.eval()
    x, t, _ = _train_batch()
    thres = 0.15
    budget = A.Budget(0.05, 10, random_start=True)
    rule = A.SignStep(0.0125)
    clean = model.predict(x)
    n_clean = _count(clean, thres)
    assert n_clean >= 2
    van_x = A.run_attack(model, TogVanishing(), rule, budget, x).images
    fab_x = A.run_attack(model, TogFabrication(), rule, budget, x).images
    van = model.predict(van_x)
    assert _count(van, thres) < n_clean
    # fabrication: what it optimises (every anchor's objectness pulled towards "object": the mean log-sigmoid) rises;
    # the count of detections above one threshold is a consequence this memorising tiny model does not always show
    # (6 -> 6 on one CPU, 6 -> 5 under ATEN_CPU_CAPABILITY=default), and the sum of objectness probabilities may
    # even fall while the mean log-sigmoid rises
    with torch.no_grad():
        assert float(TogFabrication()(model, fab_x, None).sum()) > float(TogFabrication()(model, x, None).sum())
    # untargeted: no ground truth needed, and the ground-truth loss goes up
    unt = A.run_attack(model, TogUntargeted(thres), rule, budget, x, targets=None)
    with torch.no_grad():
        assert (A.per_image_losses(model, unt.images, t) > A.per_image_losses(model, x, t)).all()
    # mislabel: the outputs that carry each confident detection change their class (measured on those outputs: this
    # memorising tiny model tends to lose the detection's confidence altogether)
    import torchvision

    mis_obj = TogMislabel(thres)
    with torch.no_grad():
        ctx = mis_obj.prepare(model, x, None)
        before = model.output_slots(x)
    adv = A.run_attack(model, mis_obj, A.APGDStep(), A.Budget(0.1, 20), x, targets=None).images
    with torch.no_grad():
        after = model.output_slots(adv)
        # the objective (object, new class, box kept: one weighted sum) rose on every image: APGD keeps each image's
        # best point, and without a random start the clean image is its first
        assert (mis_obj(model, adv, ctx) > mis_obj(model, x, ctx)).all()
    changed, kept_box, margin, n = 0, 0, 0.0, 0
    for i, c in enumerate(ctx):
        for s_, new, w in zip(c["slots"].tolist(), c["label"].tolist(), c["weight"].tolist()):
            if w < 0.05:  # the slots that carry the detection
                continue
            n += 1
            old = int(before["cls"][i, s_].argmax())
            assert old != new
            changed += int(after["cls"][i, s_].argmax()) != old
            gap = lambda z: float(z[i, s_, new] - z[i, s_, old])  # noqa: E731
            margin += gap(after["cls"]) - gap(before["cls"])
            kept_box += float(torchvision.ops.box_iou(before["boxes"][i, s_:s_ + 1],
                                                      after["boxes"][i, s_:s_ + 1])) >= 0.5
    # how many of those slots keep their box is not asserted: the box is one term of the objective, which the
    # optimiser trades against the class term as this model's weights happen to make it (kept by 9 of 14 slots on an
    # AVX-512 CPU, more here: training luck, issue 26); the objective as a whole is asserted above
    assert n >= 2 and changed >= 0.5 * n and margin / n > 4, (n, changed, kept_box, margin)


def _mislabel_per_image(model, images, ctx):
    """TOG-mislabel's objective one image at a time, written out plainly: the reference for the batched one."""
    import torch.nn.functional as F
    import torchvision

    slots = model.output_slots(images)
    out = []
    for i, c in enumerate(ctx):
        if not len(c["slots"]):
            out.append(slots["obj"].new_zeros(()))
            continue
        idx = c["slots"]
        obj, cls, new = slots["obj"][i][idx], slots["cls"][i][idx], c["label"]
        loss = F.binary_cross_entropy_with_logits(obj, torch.ones_like(obj), reduction="none")
        loss = loss + F.binary_cross_entropy_with_logits(cls, F.one_hot(new, cls.shape[1]).float(),
                                                         reduction="none").sum(1)
        loss = loss + torchvision.ops.generalized_box_iou_loss(slots["boxes"][i][idx], c["box"], reduction="none")
        out.append(-(loss * c["weight"]).sum())
    return torch.stack(out)


def test_batched_mislabel_objective_equals_the_per_image_one(overfit):
    """The batch's slots in one pass give each image's value and input gradient of the per-image loop, also with
    an image that has no confident detection (value 0, no gradient)."""
    from fa_train.models import load_model

    model, _ = load_model(str(overfit))
    model.eval()
    x, _, _ = _train_batch()
    x = torch.cat([x, torch.zeros_like(x[:1])])
    obj = TogMislabel(0.15)
    with torch.no_grad():
        ctx = obj.prepare(model, x, None)
    ctx[-1] = {"slots": torch.zeros(0, dtype=torch.long)}  # as prepare leaves an image without a detection
    assert len(ctx[0]["slots"]) and len(ctx[1]["slots"])
    grads = []
    for fn in (obj, _mislabel_per_image):
        xg = x.clone().requires_grad_(True)
        v = fn(model, xg, ctx)
        (g,) = torch.autograd.grad(v.sum(), xg)
        grads.append((v.detach(), g))
    (v1, g1), (v2, g2) = grads
    assert v1.shape == (3,) and float(v1[-1]) == 0.0 and float(v1[0]) < 0
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert float(g1[-1].abs().max()) == 0.0


def test_tog_effects_count_kept_lost_relabelled_fabricated():
    b = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    clean = {"boxes": b, "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([0, 1, 2])}
    adv = {"boxes": torch.cat([b[:2] + 0.5, torch.tensor([[60.0, 60, 70, 70], [61, 61, 70, 70]])]),
           "scores": torch.tensor([0.9, 0.9, 0.9, 0.1]), "labels": torch.tensor([0, 3, 1, 1])}
    e = TogEffects()
    e.add(clean, adv, 0.5)
    assert e.as_dict() == {"clean": 3, "kept": 1, "lost": 1, "relabelled": 1, "fabricated": 1, "adversarial": 3}


@pytest.mark.parametrize("arch", ["yolov3", "fasterrcnn"])
def test_class_wise_loss_averages_per_class(arch, tiny_yolo):
    model = (tiny_yolo if arch == "yolov3" else _frcnn()).eval().double()
    x = _images(1, torch.float64)
    t = [{"boxes": torch.tensor([[4.0, 4, 30, 30], [30, 30, 60, 60], [10, 34, 30, 60]]),
          "labels": torch.tensor([0, 0, 2]), "ignore": torch.tensor([False, False, False])}]
    per_object = model.object_losses(x, t)[0]
    assert per_object.shape == (3,) and torch.isfinite(per_object).all()
    expect = ((per_object[0] + per_object[1]) / 2 + per_object[2]) / 2
    torch.testing.assert_close(ClassWise()(model, x, t)[0], expect)
    t[0]["ignore"] = torch.tensor([False, True, False])
    assert torch.isnan(model.object_losses(x, t)[0][1])


def test_batched_class_wise_objective_equals_the_per_image_one(tiny_yolo):
    """The one-pass class-wise objective against each image's mean over its classes of the class means, written
    out per image: values and input gradients, with an ignored object (NaN loss) and an image without objects."""
    model = tiny_yolo.eval()
    x = _images(3)
    t = make_targets(3)
    t[0] = {"boxes": torch.tensor([[4.0, 4, 30, 30], [30, 30, 60, 60], [10, 34, 30, 60]]),
            "labels": torch.tensor([1, 1, 3]), "ignore": torch.tensor([False, True, False])}
    t[2] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
            "ignore": torch.zeros(0, dtype=torch.bool)}

    def per_image(m, images, ctx):
        out = []
        for losses, tt in zip(m.object_losses(images, ctx), ctx):
            ok = ~torch.isnan(losses)
            if not ok.any():
                out.append(losses.new_zeros(()))
                continue
            lab, val = tt["labels"][ok], losses[ok]
            out.append(torch.stack([val[lab == c].mean() for c in lab.unique()]).mean())
        return torch.stack(out)

    results = []
    for fn in (ClassWise(), per_image):
        xg = x.clone().requires_grad_(True)
        v = fn(model, xg, t)
        (g,) = torch.autograd.grad(v.sum(), xg)
        results.append((v.detach(), g))
    (v1, g1), (v2, g2) = results
    assert v1.shape == (3,) and float(v1[2]) == 0.0 and bool((v1[:2] > 0).all())
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert float(g1[2].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------- worst case, CLI


def test_worst_case_keeps_the_largest_loss_candidate_per_image():
    wc = WorstCase(3)
    assert wc.update("a", torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64)).tolist() == [True] * 3
    assert wc.update("b", torch.tensor([2.0, 4.0, 2.0], dtype=torch.float64)).tolist() == [True, False, False]
    assert wc.source == ["b", "a", "a"]
    assert worst_row({"a": 0.3, "b": 0.2}, 0.25, ["a", "b"]) == (0.2, "b")
    assert worst_row({"a": 0.3, "b": 0.2}, 0.1, ["a", "b"]) == (0.1, "per-image largest loss")


def test_parse_attacks():
    assert parse_attacks("suite") == SUITE
    assert parse_attacks("cwa, pgd,apgd") == ("pgd", "apgd", "cwa")
    assert parse_attacks("none") == ("none",)
    for bad in ("pgd,none", "pgd,cls", "fgsm", ""):
        with pytest.raises(ValueError):
            parse_attacks(bad)


def test_robustness_suite_worst_case_is_never_above_any_attack(overfit):
    from fa_train.models import load_model
    from fa_train.data import build_dataset
    from fa_train.engine import make_loader
    from fa_train.evaluation import robustness

    model, _ = load_model(str(overfit))
    ds = build_dataset("synth:60", "train", 64, split="shapes:train", max_images=2, log=None)
    res = robustness(model.eval(), make_loader(ds, 2, False, 0), torch.device("cpu"), eps=EPS, steps=(1, 2),
                     attack="suite", apgd_iterations=3, tog_score=0.3, progress=False)
    row = res["row"]
    attacks = [c for c in res["columns"] if c not in ("clean", "advAP", "acAP", "worst")]
    assert attacks == ["PGD-1", "PGD-2", "apgd", "tog-vanishing", "tog-fabrication", "tog-mislabel",
                       "tog-untargeted", "cwa"]
    assert all(row["worst"] <= row[c] for c in attacks)
    assert row["worst"] <= res["worst_loss_selected"]
    assert set(res["tog"]) == {"tog-vanishing", "tog-fabrication", "tog-mislabel", "tog-untargeted"}
    assert res["tog"]["tog-vanishing"]["clean"] > 0


def test_fa_bench_attack_lists_json_markdown_and_errors(overfit, tmp_path):
    from fa_deploy.cli import main as bench_main

    js, md = tmp_path / "b.json", tmp_path / "b.md"
    common = ["--weights", str(overfit), "--data", "synth:60", "--test-split", "shapes:train", "--max-images", "2",
              "--batch-size", "2", "--workers", "0", "--quiet", "--steps", "1", "--apgd-iterations", "2"]
    r = CliRunner().invoke(bench_main, common + ["--attack", "apgd,tog-vanishing", "--json", str(js),
                                                 "--markdown", str(md), "--tog-score", "0.3"])
    assert r.exit_code == 0, r.output
    out = json.loads(js.read_text())
    assert out["columns"] == ["model", "method", "clean", "apgd", "tog-vanishing", "worst"]
    assert "TOG: confident clean detections" in r.output and "| tog-vanishing |" in md.read_text()
    for bad in (["--attack", "pgd,fgsm"], ["--attack", "pgd,none"], ["--restarts", "0"]):
        r = CliRunner().invoke(bench_main, common + bad)
        assert r.exit_code == 2 and "--" in r.output, r.output


def test_harness_runs_every_attack_with_a_worst_case(overfit):
    from fa_deploy.runtime.backends import TorchBackend
    from fa_deploy.robustness.harness import gate, run_harness
    from fa_train.models import load_model
    from fa_train.data import build_dataset
    from fa_train.engine import make_loader

    model, _ = load_model(str(overfit))
    model.eval()
    ds = build_dataset("synth:60", "train", 64, split="shapes:train", max_images=2, log=None)
    res = run_harness(model, [TorchBackend(model)], make_loader(ds, 2, False, 0), torch.device("cpu"), EPS,
                      steps=(1,), attack="pgd,apgd,tog-untargeted", progress=False, latency_iters=1,
                      apgd_iterations=2, tog_score=0.3)
    src, twin = res["rows"]
    for c in ("clean", "PGD-1", "apgd", "tog-untargeted", "advAP", "worst"):
        assert src[c] == twin[c], c
    assert {"drop_clean", "drop_advAP", "drop_worst"} <= set(twin) and gate(res["rows"], 0.0) == []


# ---------------------------------------------------------------------------------------------- --sanity


def _masked_checkpoint(overfit, path):
    """The overfit model behind an input quantizer to 8 levels (zero gradient almost everywhere), saved as a
    checkpoint of a registered test architecture."""
    from fa_train.checkpoint import load_checkpoint
    from fa_train.models import register_model
    from fa_train.models.yolov3 import YoloV3, yolov3

    class Quantized8(YoloV3):
        model_name = "yolov3_quantized8_test"

        def _normalize(self, images):
            return super()._normalize(torch.round(images * 7) / 7)

        def arch_config(self):
            return {**super().arch_config(), "name": self.model_name}

    @register_model("yolov3_quantized8_test")
    def build(num_classes, **kw):
        m = yolov3(num_classes, **kw)
        q = Quantized8(m.cfg)
        return q

    ckpt = load_checkpoint(str(overfit))
    ckpt["arch"] = {**ckpt["arch"], "name": "yolov3_quantized8_test"}
    torch.save(ckpt, path)
    return path


def test_sanity_flags_a_gradient_masking_model_and_passes_an_ordinary_one(overfit, tmp_path):
    from fa_deploy.cli import main as bench_main

    masked = _masked_checkpoint(overfit, tmp_path / "masked.pt")
    common = ["--data", "synth:60", "--test-split", "shapes:train", "--max-images", "2", "--batch-size", "2",
              "--workers", "0", "--quiet", "--apgd-iterations", "5", "--restarts", "2", "--sanity-eps",
              "0.01,0.03,0.1", "--sanity-steps", "1,5,10"]
    r = CliRunner().invoke(bench_main, common + ["--weights", str(overfit), "--sanity", str(tmp_path / "ok")])
    assert r.exit_code in (0, 1), r.output
    ok = json.loads((tmp_path / "ok" / "sanity.json").read_text())
    # every check passes on the ordinary model, except perhaps "about zero at eps 0.1": how far 5 APGD iterations
    # get on two images depends on the model this CPU trained (0.0 on one, 0.65 on another); compared below
    failed_ok = {row["check"] for row in ok["rows"] if row["result"] == "FAIL"}
    assert failed_ok <= {"AP50 about zero at eps 0.1"}, ok["rows"]
    assert r.exit_code == (1 if failed_ok else 0) and ("sanity: PASS" in r.output) == (not failed_ok)
    assert (tmp_path / "ok" / "sanity_curves.png").is_file() and (tmp_path / "ok" / "sanity.md").is_file()
    r = CliRunner().invoke(bench_main, common + ["--weights", str(masked), "--sanity", str(tmp_path / "bad"),
                                                 "--transfer-from", str(overfit)])
    assert r.exit_code == 1, r.output
    out = json.loads((tmp_path / "bad" / "sanity.json").read_text())
    failed = {row["check"] for row in out["rows"] if row["result"] == "FAIL"}
    # zero gradients: APGD does not move AP50 even at eps 0.1
    assert "AP50 about zero at eps 0.1" in failed, out["rows"]
    assert "gradient masking" in r.output or "masked gradients" in r.output
    # on 2 images the tolerance is one image's worth (0.5): transfer's lead over white-box here (measured 0.04) is
    # no evidence of masking on its own; the row says which tolerance it used
    rows = {row["check"]: row for row in out["rows"]}
    assert "tol 0.5000 = max(0.01, 1/2 images)" in rows["transfer does not beat white-box"]["detail"]
    # the attack moves the ordinary model's AP50 at eps 0.1 below the masked one's (its gradients lead)
    ap_at = {name: dict(map(tuple, o["details"][0]["curves"]["eps_curve"]))[0.1]
             for name, o in (("ok", ok), ("bad", out))}
    assert ap_at["ok"] < ap_at["bad"], ap_at


def test_float32_batch_size_moves_apgd_and_cwa_within_the_stated_bound(overfit):
    """Issue 23, defect 3, what holds in float32 (docs/attacks.md): a batched float32 forward differs from one
    image at a time in the last bits, which can send an APGD / cwa trajectory elsewhere; each AP50 column may then
    move with --batch-size by at most one image's worth (1 / images), and the paper's PGD rows not at all."""
    from fa_deploy import api

    common = dict(attack="pgd,apgd,cwa", steps=(1, 3), eps=0.03, apgd_iterations=5, test_split="shapes:train",
                  max_images=4, workers=0, write=False)
    rows = [api.bench(str(overfit), batch_size=b, **common).rows[0] for b in (4, 1)]
    for col in ("PGD-1", "PGD-3"):
        assert rows[0][col] == rows[1][col], col
    for col in ("apgd", "cwa", "worst"):
        assert abs(rows[0][col] - rows[1][col]) <= 1 / 4 + 1e-9, (col, rows)


def test_float32_batch_size_moves_faster_rcnn_columns_within_the_stated_bound(frcnn_exported):
    """The same statement on Faster R-CNN (the session's tiny trained one): PGD rows and each AP50 column within
    one image's worth across batch sizes."""
    from fa_deploy import api

    weights = str(frcnn_exported[0])
    common = dict(attack="pgd,apgd,cwa", steps=(1,), eps=0.03, apgd_iterations=3, max_images=4, workers=0,
                  write=False)
    rows = [api.bench(weights, batch_size=b, **common).rows[0] for b in (4, 1)]
    for col in ("clean", "PGD-1", "apgd", "cwa", "worst"):
        assert abs(rows[0][col] - rows[1][col]) <= 1 / 4 + 1e-9, (col, rows)


def test_float32_batch_size_on_faster_rcnn_keeps_each_images_loss_close():
    """The float32 statement on Faster R-CNN: APGD's and cwa's images at batch 3 and one at a time stay in the
    ball and reach per-image objective values within 5 % of each other (float64 makes them equal: above)."""
    model = _frcnn().eval()
    x, t = _images(3), make_targets(3)
    keys = [11, 12, 13]
    for col in _plan(model, ("apgd", "cwa"), iterations=5):
        batch = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=keys)
        single = torch.cat([A.run_attack(model, col.objective, col.rule, col.budget, x[i:i + 1], t[i:i + 1],
                                         image_keys=keys[i:i + 1]).values for i in range(3)])
        assert (batch.images - x).abs().max() <= EPS + 1e-6
        rel = (batch.values - single).abs() / single.abs().clamp_min(1e-6)
        assert rel.max() <= 0.05, (col.column, batch.values, single)
