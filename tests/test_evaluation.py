"""Evaluation: AP of hand-built detections equals what pycocotools computes directly on the same json."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

from fa_train.data.common import DetectionDataset, Record
from fa_train.evaluation import coco_evaluate, coco_ground_truth, detections_to_coco


def _dataset():
    recs = [
        Record(1, "a.jpg", 200, 100, np.array([[10, 10, 60, 60], [100, 20, 180, 90]], np.float32),
               np.array([0, 1]), np.array([False, False])),
        Record(2, "b.jpg", 120, 160, np.array([[5, 5, 50, 80], [60, 60, 110, 150]], np.float32),
               np.array([1, 0]), np.array([False, True])),  # the second is difficult / crowd
    ]
    return DetectionDataset(recs, ["cat", "dog"], img_size=64)


def _identity_meta(image_id, h, w):
    return {"image_id": image_id, "orig_size": (h, w), "scale": (1.0, 1.0), "pad": (0, 0)}


def _dets(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


CASES = {
    "perfect": [
        _dets([[10, 10, 60, 60], [100, 20, 180, 90]], [0.9, 0.8], [0, 1]),
        _dets([[5, 5, 50, 80]], [0.7], [1]),
    ],
    "shifted": [
        _dets([[20, 20, 70, 70], [100, 20, 180, 90]], [0.9, 0.8], [0, 1]),  # IoU 0.47 with its GT: a miss at 0.5
        _dets([[8, 5, 53, 80]], [0.7], [1]),
    ],
    "missing": [_dets([[10, 10, 60, 60]], [0.9], [0]), _dets([], [], [])],
    "duplicate": [
        _dets([[10, 10, 60, 60], [11, 10, 60, 61], [100, 20, 180, 90]], [0.9, 0.95, 0.8], [0, 0, 1]),
        _dets([[5, 5, 50, 80], [60, 60, 110, 150]], [0.7, 0.99], [1, 0]),  # the 2nd hits the ignore region
    ],
}


def _pycocotools_direct(tmp_path, ds, results):
    """Independent path: json files on disk, COCO() and COCOeval exactly as pycocotools' docs show."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 120, "height": 160}],
          "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], "annotations": []}
    for r in ds.records:
        for b, l, ig in zip(r.boxes, r.labels, r.ignore):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": r.image_id,
                                      "category_id": int(l) + 1, "iscrowd": int(ig),
                                      "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                      "area": float((b[2] - b[0]) * (b[3] - b[1]))})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(tmp_path / "gt.json"))
        if not results:
            return 0.0
        (tmp_path / "dt.json").write_text(json.dumps(results))
        cd = cg.loadRes(str(tmp_path / "dt.json"))
        ev = COCOeval(cg, cd, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1]


@pytest.mark.parametrize("case", list(CASES))
def test_ap50_matches_pycocotools(tmp_path, case):
    ds = _dataset()
    metas = [_identity_meta(1, 100, 200), _identity_meta(2, 160, 120)]
    results = detections_to_coco(CASES[case], metas, ds.label_to_cat_id)
    ours = coco_evaluate(coco_ground_truth(ds), results, ds.class_names)
    direct = _pycocotools_direct(tmp_path, ds, results)
    assert ours["AP50"] == pytest.approx(direct, abs=1e-9)
    expected = {"perfect": 1.0, "missing": None, "shifted": None, "duplicate": 1.0}[case]
    if expected is not None:
        assert ours["AP50"] == pytest.approx(expected, abs=1e-6)
    if case == "missing":  # cat found 1 of 1, dog 0 of 2 -> mean of 1.0 and 0.0
        assert ours["per_class_AP50"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(0.0)}
    if case == "shifted":
        assert ours["per_class_AP50"]["dog"] == pytest.approx(1.0) and ours["per_class_AP50"]["cat"] == 0.0


def test_predictions_mapped_back_from_letterbox():
    ds = _dataset()
    meta = {"image_id": 1, "orig_size": (100, 200), "scale": (0.32, 0.32), "pad": (0, 16)}
    # a detection on the letterboxed 64 px image that is exactly the first GT box
    det = _dets([[10 * 0.32, 10 * 0.32 + 16, 60 * 0.32, 60 * 0.32 + 16]], [0.9], [0])
    res = detections_to_coco([det], [meta], ds.label_to_cat_id)
    np.testing.assert_allclose(res[0]["bbox"], [10, 10, 50, 50], atol=1e-4)


def test_no_detections_gives_zero():
    ds = _dataset()
    out = coco_evaluate(coco_ground_truth(ds), [], ds.class_names)
    assert out["AP50"] == 0.0
