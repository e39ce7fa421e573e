"""What an attack may change and where it starts (issue 23's risks): the letterbox padding the data pipeline adds
stays clean (an attacker perturbs the image, not the pipeline's padding), every randomly started attack of the
suite draws its own start, and ties a float32 last bit could flip are resolved one way."""
import numpy as np
import torch

from conftest import make_targets
from fa_train.adversarial import attacks as A
from fa_train.adversarial.suite import AttackSettings, WorstCase, attack_plan
from fa_train.data.transforms import PAD_VALUE, content_mask, letterbox


def test_content_mask_is_exactly_the_letterboxed_image():
    """Against letterbox itself: the mask is False exactly where letterbox wrote its padding (an image with no
    pixel of the padding's value), for landscape, portrait, square and odd sizes."""
    rng = np.random.default_rng(0)
    for h, w in [(40, 64), (64, 40), (64, 64), (37, 101), (1, 90)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[img == 114] = 115  # no image pixel equals the padding value
        out, _, meta = letterbox(img, np.zeros((0, 4)), 64)
        padding = (out == PAD_VALUE).all(0)
        m = content_mask([meta], 64)[0, 0]
        assert torch.equal(~m, padding), (h, w)
    assert content_mask([{"image_id": 3}], 8).all()  # no letterbox geometry: every pixel is the image's


def test_attacks_leave_the_padding_clean_and_change_the_image(tiny_yolo):
    model = tiny_yolo.eval()
    x, t = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), make_targets(2)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    mask[0, :, 12:52, :] = True  # a landscape image
    mask[1, :, :, 20:44] = True  # a portrait one
    for col in attack_plan(model, ("pgd", "apgd", "tog-vanishing", "cwa"),
                           AttackSettings(0.03, (2,), 3, 2, tog_score=0.0)):
        adv = A.run_attack(model, col.objective, col.rule, col.budget, x, t, image_keys=[1, 2], mask=mask).images
        moved = (adv - x).abs() > 0
        assert not (moved & ~mask).any(), col.column
        assert (moved & mask).float().mean() > 0.3, col.column  # the image itself is attacked
        assert (adv - x).abs().max() <= 0.03 + 1e-6
    adv = A.pgd_attack(model, x, t, eps=0.03, steps=2, mask=mask)
    assert not ((adv != x) & ~mask).any()


def test_each_attack_draws_its_own_random_start(tiny_yolo):
    """The suite's randomly started attacks start each image from different points (the seed names the attack),
    and the same settings give the same starts."""
    s = AttackSettings(0.03, (1,), 2, 1, seed=5)
    plan = attack_plan(tiny_yolo, ("apgd", "cwa", "tog-vanishing", "tog-fabrication", "tog-mislabel",
                                   "tog-untargeted"), s)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    starts = [A.start_points(x, c.budget, [7], [0]) for c in plan]
    for i in range(len(starts)):
        for j in range(i):
            assert not torch.equal(starts[i], starts[j]), (plan[i].column, plan[j].column)
    again = attack_plan(tiny_yolo, ("apgd", "cwa"), s)
    assert [c.budget.seed for c in again] == [c.budget.seed for c in plan[:2]]
    other = attack_plan(tiny_yolo, ("apgd",), AttackSettings(0.03, (1,), 2, 1, seed=6))
    assert other[0].budget.seed != plan[0].budget.seed


def test_ties_below_the_margin_go_to_the_earlier_point():
    a = torch.tensor([1.0, 100.0, 0.5, 3.0], dtype=torch.float64)
    bump = torch.tensor([1e-6, 1e-4, 1e-7, 1e-3], dtype=torch.float64)  # float32 noise vs a real gain
    assert A.clearly_greater(a + bump, a).tolist() == [False, False, False, True]
    assert A.clearly_greater(torch.tensor([0.0]), torch.tensor([-float("inf")])).all()
    values = torch.tensor([[2.0, 5.0], [2.0 + 1e-7, 5.5], [2.0 - 1e-7, 5.5]], dtype=torch.float64)
    assert A.best_restart(values).tolist() == [0, 1]  # restart 1 is a tie for image 0, a real gain for image 1
    wc = WorstCase(2)
    wc.update("a", torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert wc.update("b", torch.tensor([1.0 + 1e-7, 1.5], dtype=torch.float64)).tolist() == [False, True]
    assert wc.source == ["a", "b"]
