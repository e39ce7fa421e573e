"""`fa-bench --sanity`'s checks beyond the curves (issue 23's "Risks", issue 22's gradient-free check): uniform noise
at eps, the gradient-free random search (`attacks.square_attack`), restarts that help a lot, and the tolerance that
grows on few images. Verdict logic on synthetic curves (both outcomes of every check); noise and search on a tiny
seeded YOLOv3 (in the ball, in [0, 1], reproducible, independent of the batch); one end-to-end run."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_targets
from fa_train.adversarial import attacks
from fa_train.adversarial.sanity import RESTART_GAIN, sanity_verdicts, tolerance

# ---------------------------------------------------------------------------------------------- verdicts


def _curves(n_images=1000, clean=0.8, white_box=0.30, restarts=(0.30, 0.29), transfer=None, noise=0.7, search=0.5):
    """Curves of a model whose gradients lead (every check passes) unless a value is overridden."""
    return {"clean": clean, "eps_curve": [(0.01, 0.5), (0.03, white_box), (0.1, 0.05)],
            "steps_curve": [(1, 0.5), (5, 0.35), (20, white_box)], "restarts": [(1, restarts[0]), (3, restarts[1])],
            "transfer": transfer, "white_box": white_box, "noise": noise, "search": search, "queries": 100,
            "n_images": n_images, "eps": 0.03, "iterations": 20}


def _verdicts(**kw):
    return {c.name: c for c in sanity_verdicts(_curves(**kw))}


def test_an_ordinary_model_passes_every_check_and_each_new_check_is_a_row():
    checks = _verdicts(transfer=0.35)
    assert {"uniform noise not stronger than the attack", "gradient-free search not stronger than white-box",
            "restarts do not help much", "restarts never raise the worst case", "transfer does not beat white-box",
            "AP50 non-increasing with steps", "AP50 non-increasing with eps",
            "AP50 about zero at eps 0.1"} == set(checks)
    assert all(c.passed for c in checks.values()), [c.detail for c in checks.values() if not c.passed]
    row = checks["gradient-free search not stronger than white-box"].as_row()
    assert set(row) == {"check", "result", "detail", "violation is a sign of"} and row["result"] == "PASS"
    assert "masked" in row["violation is a sign of"]


def test_noise_stronger_than_the_attack_fails():
    # 1000 images: tol 0.01; noise 0.28 against white-box 0.30 is 0.02 below
    c = _verdicts(noise=0.28)["uniform noise not stronger than the attack"]
    assert not c.passed and "0.2800" in c.detail and "0.3000" in c.detail and "tol 0.0100" in c.detail
    assert _verdicts(noise=0.295)["uniform noise not stronger than the attack"].passed  # within tol


def test_gradient_free_search_stronger_than_white_box_fails():
    c = _verdicts(search=0.25)["gradient-free search not stronger than white-box"]
    assert not c.passed and "100 queries" in c.detail and "0.2500" in c.detail
    assert _verdicts(search=0.295)["gradient-free search not stronger than white-box"].passed


def test_restarts_that_help_a_lot_fail_and_a_little_help_passes():
    tol = tolerance(1000)
    # 3 restarts lower AP50 by 0.05 > 3 x 0.01
    c = _verdicts(restarts=(0.35, 0.30))["restarts do not help much"]
    assert not c.passed and "0.0500" in c.detail and f"{RESTART_GAIN * tol:.4f}" in c.detail
    ok = _verdicts(restarts=(0.32, 0.30))["restarts do not help much"]  # 0.02 <= 0.03
    assert ok.passed
    # the old check is independent of the new one: restarts that raise AP50 fail it and pass the new one
    up = _verdicts(restarts=(0.30, 0.35))
    assert not up["restarts never raise the worst case"].passed and up["restarts do not help much"].passed


def test_no_restart_row_without_restarts_and_no_new_rows_for_old_curves():
    old = _curves()
    old["restarts"] = [(1, 0.3)]
    for key in ("noise", "search", "n_images"):
        del old[key]
    names = {c.name for c in sanity_verdicts(old)}
    assert not names & {"restarts do not help much", "restarts never raise the worst case",
                        "uniform noise not stronger than the attack",
                        "gradient-free search not stronger than white-box"}
    assert all("tol 0.0100)" in c.detail for c in sanity_verdicts(old) if "about zero" not in c.name)


def test_tolerance_grows_on_few_images_and_is_the_floor_on_many():
    assert tolerance(2) == pytest.approx(0.5) and tolerance(16) == pytest.approx(1 / 16)
    assert tolerance(100) == pytest.approx(0.01) and tolerance(5000) == pytest.approx(0.01)
    assert tolerance(None) == pytest.approx(0.01)
    # a random search 0.1 AP50 ahead of white-box: evidence on 1000 images, one image's worth on 5
    many = _verdicts(n_images=1000, search=0.2)["gradient-free search not stronger than white-box"]
    few = _verdicts(n_images=5, search=0.2)["gradient-free search not stronger than white-box"]
    assert not many.passed and few.passed
    assert "tol 0.2000 = max(0.01, 1/5 images)" in few.detail and "1/1000 images" in many.detail
    # every check that compares two AP50 values scales the same way
    for name in ("transfer does not beat white-box", "uniform noise not stronger than the attack"):
        assert not _verdicts(n_images=1000, transfer=0.2, noise=0.2)[name].passed
        assert _verdicts(n_images=5, transfer=0.2, noise=0.2)[name].passed
    assert not _verdicts(n_images=1000, restarts=(0.45, 0.30))["restarts do not help much"].passed
    assert _verdicts(n_images=5, restarts=(0.45, 0.30))["restarts do not help much"].passed
    # an explicit tolerance still wins, and the detail does not claim the formula for it
    explicit = sanity_verdicts(_curves(n_images=5, search=0.2), tol=0.01)[-1]
    assert not explicit.passed and explicit.detail.endswith("(tol 0.0100)")


# ---------------------------------------------------------------------------------------------- noise and search


def _responsive_yolo():
    """A tiny seeded YOLOv3 whose loss follows its input: its BatchNorm statistics are those of a batch of random
    images (no training). With the initial statistics (0, 1) the activations shrink layer after layer and the loss
    moves by 1e-7 of itself under any perturbation: there would be nothing for a search to find."""
    from fa_train.models import create_model

    torch.manual_seed(0)
    m = create_model("yolov3", 4, width_mult=0.125, depth_mult=0.2)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.momentum = None
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        m.loss_terms_per_image(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                               make_targets(8))
    return m.eval()


def _images(n=3):
    x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x[:, :, :8] = 0.0  # saturated rows: the clamp to [0, 1] must act
    x[:, :, -8:] = 1.0
    return x


def _in_ball(adv, x, eps):
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_uniform_noise_is_in_the_ball_reproducible_and_batch_independent():
    x, eps, keys = _images(), 0.03, ["a", "b", "c"]
    noisy = attacks.uniform_noise(x, eps, seed=0, image_keys=keys)
    _in_ball(noisy, x, eps)
    inner = (x > eps) & (x < 1 - eps)  # pixels the clamp does not touch: the draw itself, uniform on [-eps, eps]
    u = ((noisy - x)[inner] / eps).double()
    assert abs(float(u.mean())) < 0.01 and float(u.abs().mean()) == pytest.approx(0.5, abs=0.01)
    assert float(u.abs().max()) > 0.99
    assert torch.equal(noisy, attacks.uniform_noise(x, eps, seed=0, image_keys=keys))
    one_by_one = torch.cat([attacks.uniform_noise(x[i:i + 1], eps, seed=0, image_keys=keys[i:i + 1]) for i in range(3)])
    assert torch.equal(noisy, one_by_one)
    assert not torch.equal(noisy, attacks.uniform_noise(x, eps, seed=1, image_keys=keys))
    # not the draw of an attack's random start on the same seed and keys
    start = attacks.start_points(x, attacks.Budget(eps, 1, random_start=True, seed=0), keys, [0, 0, 0])
    assert not torch.equal(noisy, start)
    assert torch.equal(x, _images())  # the input is left alone


class _Counting:
    """The per-image detection loss, counting calls (each is one batched forward: one query per image)."""

    def __init__(self):
        from fa_train.adversarial.attack_objectives import DetectionLoss

        self.inner, self.calls = DetectionLoss(per_image=True), 0

    def prepare(self, model, images, targets):
        return self.inner.prepare(model, images, targets)

    def __call__(self, model, images, ctx):
        self.calls += 1
        return self.inner(model, images, ctx)


def test_random_search_stays_in_the_ball_raises_the_loss_and_does_not_depend_on_the_batch():
    model, x, targets, keys, eps = _responsive_yolo(), _images(), make_targets(3), [11, 12, 13], 0.03
    counting = _Counting()
    res = attacks.square_attack(model, x, targets, eps, queries=16, seed=0, image_keys=keys, objective=counting)
    assert counting.calls == 16
    _in_ball(res.images, x, eps)
    # every pixel sits at a corner of the ball (Square attack's +-eps) unless the clamp to [0, 1] moved it
    d = res.images - x
    inner = (x >= eps) & (x <= 1 - eps)
    assert torch.allclose(d[inner].abs(), torch.full_like(d[inner], eps), atol=1e-6)
    # the returned loss is each image's own loss at the returned image, computed alone
    with torch.no_grad():
        alone = torch.cat([attacks.per_image_losses(model, res.images[i:i + 1], targets[i:i + 1]) for i in range(3)])
        clean = attacks.per_image_losses(model, x, targets)
    assert torch.allclose(res.values.float(), alone, rtol=1e-5)
    # the search improves on its start (the stripes: the first query), and the loss it reports is not the clean one
    start = attacks.square_attack(model, x, targets, eps, queries=1, seed=0, image_keys=keys)
    assert (res.values >= start.values).all() and (res.values > start.values * (1 + 1e-3)).any()
    assert not torch.allclose(res.values.float(), clean)
    # reproducible across calls, and a batch of 3 gives the images 3 batches of 1 give
    single = [attacks.square_attack(model, x[i:i + 1], targets[i:i + 1], eps, queries=16, seed=0,
                                    image_keys=keys[i:i + 1]) for i in range(3)]
    assert torch.equal(torch.cat([s.images for s in single]), res.images)
    # (the losses themselves differ in the last float32 bits between batch sizes: the acceptance margin absorbs it)
    assert torch.allclose(torch.cat([s.values for s in single]), res.values, rtol=1e-6)
    other = attacks.square_attack(model, x, targets, eps, queries=1, seed=1, image_keys=keys)
    assert not torch.equal(other.images, start.images)  # another seed, other stripes
    assert torch.equal(x, _images())


def test_random_search_on_faster_rcnn_stays_in_the_ball_and_raises_the_loss():
    """The other detector's per-image loss through the same search. Not asserted: batch independence. Faster R-CNN's
    per-image loss itself differs between a batch of 3 and the image alone (measured on this model: loss_classifier
    1.96070 against 1.95995 on one candidate image: another set of sampled proposals, not a last-bit difference),
    and the search inherits it (issue 23, item 3)."""
    from fa_train.models import create_model

    torch.manual_seed(0)
    model = create_model("fasterrcnn_resnet50_fpn", 4, backbone="resnet18", fpn_channels=32, min_size=64,
                         max_size=64).eval()
    x, targets, keys, eps = _images(), make_targets(3), [1, 2, 3], 0.03
    res = attacks.square_attack(model, x, targets, eps, queries=8, seed=0, image_keys=keys)
    _in_ball(res.images, x, eps)
    start = attacks.square_attack(model, x, targets, eps, queries=1, seed=0, image_keys=keys)
    assert (res.values >= start.values).all() and (res.values > start.values).any()


def test_square_fraction_follows_square_attacks_schedule():
    # 10000 queries: p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    assert attacks.square_fraction(0, 10000) == pytest.approx(0.05)
    assert attacks.square_fraction(10, 10000) == pytest.approx(0.05)
    assert attacks.square_fraction(11, 10000) == pytest.approx(0.025)
    assert attacks.square_fraction(9000, 10000) == pytest.approx(0.05 / 512)
    # rescaled to 100 queries: query 1 is at 100 of 10000 (two halvings)
    assert attacks.square_fraction(1, 100) == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="queries"):
        attacks.square_attack(None, torch.zeros(1, 3, 8, 8), [], 0.03, queries=0)


# ---------------------------------------------------------------------------------------------- fa-bench --sanity


def test_fa_bench_sanity_shows_the_new_rows(overfit, tmp_path):
    from fa_deploy.cli import main as bench_main

    r = CliRunner().invoke(bench_main, ["--weights", str(overfit), "--sanity", str(tmp_path / "s"), "--data",
                                        "synth:60", "--test-split", "shapes:train", "--max-images", "2",
                                        "--batch-size", "2", "--workers", "0", "--quiet", "--apgd-iterations", "3",
                                        "--restarts", "2", "--sanity-eps", "0.03,0.1", "--sanity-steps", "1,3",
                                        "--sanity-queries", "8"])
    assert r.exit_code in (0, 1), r.output
    out = json.loads((tmp_path / "s" / "sanity.json").read_text())
    rows = {row["check"]: row for row in out["rows"]}
    for name in ("uniform noise not stronger than the attack", "gradient-free search not stronger than white-box",
                 "restarts do not help much"):
        assert name in rows and rows[name]["result"] in ("PASS", "FAIL") and name in r.output
    # 2 images: tol 0.5, said in every comparing check's detail
    assert "tol 0.5000 = max(0.01, 1/2 images)" in rows["restarts do not help much"]["detail"]
    curves = out["details"][0]["curves"]
    assert curves["queries"] == 8 and curves["n_images"] == 2 and curves["tolerance"] == pytest.approx(0.5)
    assert 0.0 <= curves["noise"] <= 1.0 and 0.0 <= curves["search"] <= 1.0
    assert "random search" in r.output and "uniform noise" in r.output  # the curves table's columns
    # the exit code follows the checks: 1 exactly when one of them failed
    failed = [row for row in out["rows"] if row["result"] == "FAIL"]
    assert r.exit_code == (1 if failed else 0) and out["verdict"] == ("FAIL" if failed else "PASS")


def test_sanity_queries_must_be_positive(tmp_path):
    from fa_deploy.cli import main as bench_main

    r = CliRunner().invoke(bench_main, ["--weights", str(tmp_path / "none.pt"), "--sanity", str(tmp_path / "s"),
                                        "--sanity-queries", "0"])
    assert r.exit_code == 2 and "--sanity-queries 0" in r.output and "Traceback" not in r.output
