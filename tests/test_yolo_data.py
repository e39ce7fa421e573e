"""YOLO-format (Ultralytics) reader: agreement with the VOC reader on the real VOC files, each bad-input rule,
and fa-train on a YOLO-format dataset."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from fa_train.data import DataError, build_dataset, parse_data_spec
from fa_train.data.synthetic import SHAPES_CLASSES
from fa_train.data.voc import VOC_CLASSES, parse_sets, read_voc, voc_dataset
from fa_train.data.yolo import label_path, yolo_dataset
from fa_train.evaluation import coco_evaluate, coco_ground_truth


# ---------------------------------------------------------------------------------------------- helpers

def voc_to_yolo(records, class_names, root, split):
    """Write VOC records as a YOLO split: images/<split>/ copies, labels/<split>/*.txt. The VOC reader's
    continuous box [xmin-1, ymin-1, xmax, ymax] is written exactly (repr of the float64 values). `difficult`
    objects are dropped, as Ultralytics' own VOC conversion does: YOLO labels have no ignore flag."""
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
    for r in records:
        name = os.path.basename(r.file)
        shutil.copy(r.file, os.path.join(root, "images", split, name))
        lines = []
        for (x0, y0, x1, y1), label, ignore in zip(r.boxes.astype(np.float64), r.labels, r.ignore):
            if ignore:
                continue
            cx, cy = (x0 + x1) / 2 / r.width, (y0 + y1) / 2 / r.height
            w, h = (x1 - x0) / r.width, (y1 - y0) / r.height
            lines.append(" ".join([str(int(label))] + [repr(float(v)) for v in (cx, cy, w, h)]))
        with open(os.path.join(root, "labels", split, os.path.splitext(name)[0] + ".txt"), "w") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
    return root


def write_yaml(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def make_image(path, w=64, h=48, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path, format=fmt)


@pytest.fixture
def tiny(tmp_path):
    """A two-image YOLO dataset (64x48 and 40x80) with three classes; returns a function writing a.txt and the yaml."""
    root = tmp_path / "ds"
    make_image(root / "images" / "train" / "a.jpg", 64, 48)
    make_image(root / "images" / "train" / "b.png", 40, 80)
    make_image(root / "images" / "val" / "c.jpg", 32, 32)
    yml = write_yaml(root / "data.yaml", "path: .\ntrain: images/train\nval: images/val\n"
                                         "names: {0: cat, 1: dog, 2: bird}\n")

    def with_label(text, stem="a", split="train"):
        p = root / "labels" / split / f"{stem}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    with_label.root, with_label.yaml = root, yml
    return with_label


def read(yml, split="train", log=None, **kw):
    return yolo_dataset(yml, split, 64, train=False, log=log, **kw)


# ---------------------------------------------------------------------------------------------- VOC files

def test_voc_and_yolo_readers_give_the_same_boxes(tmp_path):
    devkit = shared_path("data", "VOCdevkit")
    voc = voc_dataset(devkit, "2007:test", 224, train=False)
    root = voc_to_yolo(voc.records, VOC_CLASSES, str(tmp_path / "voc_yolo"), "val")
    yml = write_yaml(tmp_path / "voc_yolo" / "data.yaml",
                     "path: .\ntrain: images/val\nval: images/val\nnc: 20\nnames: [" + ", ".join(VOC_CLASSES) + "]\n")
    yolo = build_dataset("yolo:" + yml, "test", 224)  # the test role reads the `val` key
    assert yolo.class_names == list(VOC_CLASSES) and yolo.label_to_cat_id == voc.label_to_cat_id
    assert [r.image_id for r in yolo.records] == [1, 2, 3, 4]  # 1..N in sorted path order
    assert [os.path.basename(r.file) for r in yolo.records] == [os.path.basename(r.file) for r in voc.records]
    assert yolo.stats.clipped == 0 and yolo.stats.dropped_zero_area == 0  # 000004's car ends at x = width
    assert root in yolo.records[0].file
    for v, y in zip(voc.records, yolo.records):
        assert (y.width, y.height) == (v.width, v.height)  # from the JPEG headers vs the XML <size>
        keep = ~v.ignore  # difficult objects were dropped by the conversion
        assert y.labels.tolist() == v.labels[keep].tolist()
        np.testing.assert_allclose(y.boxes, v.boxes[keep], rtol=0, atol=1e-4)
        assert not y.ignore.any()
    assert sum(int(v.ignore.sum()) for v in voc.records) == 1
    # the same letterboxed images and targets
    for i in range(len(voc)):
        (vi, vt, vm), (yi, yt, ym) = voc[i], yolo[i]
        assert torch.equal(vi, yi) and vm["pad"] == ym["pad"] and vm["scale"] == ym["scale"]
        torch.testing.assert_close(yt["boxes"], vt["boxes"][~vt["ignore"]], rtol=0, atol=1e-4)


def test_voc_and_yolo_ground_truth_give_the_same_ap(tmp_path):
    voc = voc_dataset(shared_path("data", "VOCdevkit"), "2007:test", 224, train=False)
    voc_to_yolo(voc.records, VOC_CLASSES, str(tmp_path / "y"), "val")
    yml = write_yaml(tmp_path / "y" / "data.yaml", "val: images/val\nnames: [" + ", ".join(VOC_CLASSES) + "]\n")
    yolo = yolo_dataset(yml, "val", 224, train=False)
    # the same detections, in original pixels, for each file: jittered objects (some too far off to match),
    # a few left out, and false positives; none on the one difficult object (a chair that YOLO labels lose)
    rng = np.random.default_rng(0)
    dets = {}
    for r in voc.records:
        out = []
        for b, l, ig in zip(r.boxes, r.labels, r.ignore):
            if ig or rng.random() < 0.2:
                continue
            wh = b[2:] - b[:2]
            j = b + rng.normal(0, 0.15, 4) * np.concatenate([wh, wh])
            out.append((j, int(l), float(rng.random())))
        for _ in range(2):
            x, y = rng.random(2) * [r.width * 0.7, r.height * 0.7]
            out.append((np.array([x, y, x + 40, y + 50]), int(rng.integers(0, 20)), float(rng.random())))
        dets[os.path.basename(r.file)] = out

    def results(ds):
        return [{"image_id": r.image_id, "category_id": ds.label_to_cat_id[l],
                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "score": s}
                for r in ds.records for b, l, s in dets[os.path.basename(r.file)]]

    a = coco_evaluate(coco_ground_truth(voc), results(voc), voc.class_names)
    b = coco_evaluate(coco_ground_truth(yolo), results(yolo), yolo.class_names)
    assert 0.2 < a["AP50"] < 0.95  # a result that boxes off by rounding errors would move
    assert b["AP50"] == pytest.approx(a["AP50"], abs=1e-9)
    for k in a["stats"]:
        assert b["stats"][k] == pytest.approx(a["stats"][k], abs=1e-9), k
    np.testing.assert_equal(b["per_class_AP50"], a["per_class_AP50"])  # nan where a class has no objects


# ---------------------------------------------------------------------------------------------- the yaml

def test_yaml_names_as_list_or_map_and_nc(tiny, tmp_path):
    for names in ("[cat, dog, bird]", "{0: cat, 1: dog, 2: bird}", "{'2': bird, '0': cat, '1': dog}"):
        yml = write_yaml(tiny.root / "n.yaml", f"train: images/train\nnc: 3\nnames: {names}\n")
        ds = read(yml)
        assert ds.class_names == ["cat", "dog", "bird"] and ds.label_to_cat_id == [1, 2, 3]
    yml = write_yaml(tiny.root / "n.yaml", "train: images/train\nnc: 2\n")  # Ultralytics' names for nc alone
    assert read(yml).class_names == ["class_0", "class_1"]
    for text, msg in [("nc: 4\nnames: [cat, dog, bird]", "'nc' is 4 but 'names' has 3 classes"),
                      ("names: {0: cat, 2: bird}", r"'names' map keys must be the class indices 0..1, got \[0, 2\]"),
                      ("names: [cat, cat]", "'names' repeats 'cat'"),
                      ("names: []", "'names' is empty"),
                      ("nc: 1", None), ("download: x", "'names' is missing")]:
        yml = write_yaml(tiny.root / "n.yaml", f"train: images/train\n{text}\n")
        if msg is None:
            read(yml)
            continue
        with pytest.raises(DataError, match="n.yaml: " + msg):
            read(yml)


def test_missing_yaml_folder_and_split_are_named(tiny, tmp_path):
    with pytest.raises(DataError, match="nothere.yaml: dataset yaml is missing"):
        read(str(tmp_path / "nothere.yaml"))
    with pytest.raises(DataError, match="is a folder; --data yolo: takes the dataset's yaml"):
        read(str(tiny.root))
    with pytest.raises(DataError, match=r"data.yaml: no split 'test' \(split keys in this yaml: train, val\)"):
        read(tiny.yaml, "test")
    yml = write_yaml(tiny.root / "t.yaml", "train: images/train\nval: images/gone\ntest:\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match=r"t.yaml: split 'val' folder 'images/gone' is missing \(resolved to .*gone\)"):
        read(yml, "val")
    with pytest.raises(DataError, match="t.yaml: split 'test' is None"):
        read(yml, "test")
    yml = write_yaml(tiny.root / "r.yaml", "path: nowhere\ntrain: images/train\nnames: [a]\n")
    with pytest.raises(DataError, match="r.yaml: dataset root 'path: nowhere' is missing"):
        read(yml)
    make_image(tiny.root / "images" / "one.jpg")
    (tiny.root / "list.txt").write_text("images/one.jpg\nlabels/train/a.txt\n")
    yml = write_yaml(tiny.root / "e.yaml", "train: images/one.jpg\nval: list.txt\nnames: [a]\n")
    with pytest.raises(DataError, match="e.yaml: split 'train' entry 'images/one.jpg' .* is neither a folder nor a .txt"):
        read(yml, "train")
    with pytest.raises(DataError, match=r"list.txt: line 2: 'labels/train/a.txt' is not an image \(.bmp, .jpeg"):
        read(yml, "val")
    yml = write_yaml(tiny.root / "bad.yaml", "train: [images/train\n")
    with pytest.raises(DataError, match="bad.yaml: not a valid yaml file"):
        read(yml)


def test_path_relative_to_the_yaml_folder_lists_and_list_files(tiny, tmp_path, monkeypatch):
    make_image(tiny.root / "images" / "extra" / "d.jpg")
    tiny("0 0.5 0.5 0.2 0.2\n", stem="d", split="extra")
    (tiny.root / "train.txt").write_text(f"./images/train/a.jpg\n\n{tiny.root / 'images' / 'extra' / 'd.jpg'}\n")
    monkeypatch.chdir(tmp_path)  # relative paths never resolve against the working directory
    yml = write_yaml(tmp_path / "cfg" / "my.yaml", "path: ../ds\ntrain: train.txt\nval: [images/train, images/val]\n"
                                                   "names: [cat, dog, bird]\n")
    ds = read(yml, "train")
    assert [os.path.basename(r.file) for r in ds.records] == ["d.jpg", "a.jpg"]  # sorted paths: images/extra first
    assert ds.records[0].labels.tolist() == [0]
    ds = read(yml, "val")
    assert [os.path.basename(r.file) for r in ds.records] == ["a.jpg", "b.png", "c.jpg"]
    ds = read(yml, "train+val")  # several keys: the union, each image once, ids 1..N in sorted path order
    assert [os.path.basename(r.file) for r in ds.records] == ["d.jpg", "a.jpg", "b.png", "c.jpg"]
    assert [r.image_id for r in ds.records] == [1, 2, 3, 4]
    (tiny.root / "train.txt").write_text("./images/train/a.jpg\n./images/train/zz.jpg\n")
    with pytest.raises(DataError, match=r"train.txt: line 2: image './images/train/zz.jpg' is missing"):
        read(yml, "train")


def test_data_spec_and_default_splits(tiny):
    assert parse_data_spec("yolo:/x/data.yaml") == ("yolo", "/x/data.yaml")
    with pytest.raises(DataError, match="yolo needs a path, e.g. yolo:"):
        parse_data_spec("yolo")
    with pytest.raises(DataError, match="yolo:PATH/data.yaml"):
        parse_data_spec("darknet:/x")
    assert [os.path.basename(r.file) for r in build_dataset("yolo:" + tiny.yaml, "train", 64).records] == \
        ["a.jpg", "b.png"]
    assert [os.path.basename(r.file) for r in build_dataset("yolo:" + tiny.yaml, "test", 64).records] == ["c.jpg"]


def test_label_path_replaces_the_last_images_component():
    def p(*parts):
        return os.sep + os.path.join(*parts)

    assert label_path(p("d", "images", "x", "images", "train", "a.b.jpg")) == p("d", "images", "x", "labels", "train",
                                                                                 "a.b.txt")
    assert label_path(p("d", "train", "a.png")) == p("d", "train", "a.txt")  # no images folder: beside the image
    assert label_path(p("d", "imagesX", "images.jpg")) == p("d", "imagesX", "images.txt")


# ---------------------------------------------------------------------------------------------- labels

def test_boxes_sizes_ids_and_letterbox(tiny):
    tiny("0 0.5 0.5 0.5 0.25\n2 0.25 0.75 0.1 0.2\n")
    tiny("1 0.5 0.5 1 1\n", stem="b")
    ds = read(tiny.yaml)
    a, b = ds.records
    assert (a.image_id, a.width, a.height, b.image_id, b.width, b.height) == (1, 64, 48, 2, 40, 80)
    np.testing.assert_allclose(a.boxes, [[16, 18, 48, 30], [12.8, 31.2, 19.2, 40.8]], atol=1e-5)
    assert a.labels.tolist() == [0, 2] and b.labels.tolist() == [1] and not a.ignore.any()
    np.testing.assert_allclose(b.boxes, [[0, 0, 40, 80]])
    assert ds.stats.clipped == 0 and a.source == str(tiny.root / "labels" / "train" / "a.txt")
    img, target, meta = ds[1]
    assert img.shape == (3, 64, 64) and target["boxes"].shape == (1, 4)
    np.testing.assert_allclose(target["boxes"][0].numpy(), [16, 0, 48, 64], atol=1e-4)


def test_coordinates_outside_the_image_are_clipped_and_counted(tiny):
    p = tiny("0 0.9 0.5 0.4 0.5\n1 -0.1 0.5 0.1 0.1\n2 0.5 0.5 0.5 0.5\n")
    ds = read(tiny.yaml)
    r = ds.records[0]
    np.testing.assert_allclose(r.boxes[0], [0.7 * 64, 12, 64, 36], atol=1e-4)  # right edge clipped
    assert r.labels.tolist() == [0, 2]  # the second lies wholly outside: zero area once clipped, dropped
    assert ds.stats.clipped == 2 and ds.stats.dropped_zero_area == 1 and ds.stats.per_file[str(p)] == 3


def test_zero_or_negative_size_is_dropped_and_counted(tiny):
    tiny("0 0.5 0.5 0 0.2\n1 0.5 0.5 -0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    ds = read(tiny.yaml)
    assert ds.records[0].labels.tolist() == [2] and ds.stats.dropped_zero_area == 2


def test_rounding_at_the_image_edge_is_not_clipping(tiny):
    tiny("0 0.9000004 0.5 0.2000004 1.0000001\n")  # 6-digit label writers: right edge 1.0000006
    ds = read(tiny.yaml)
    np.testing.assert_allclose(ds.records[0].boxes, [[51.2, 0, 64, 48]], atol=1e-3)
    assert ds.stats.clipped == 0


@pytest.mark.parametrize("line,msg", [
    ("0 0.5 0.5 0.2", r"line 2: 4 fields, expected 5: 'class cx cy w h'"),
    ("0", "line 2: 1 fields, expected 5"),
    ("0 0.5 0.5 0.2 0.2 0.9", "line 2: 6 fields; only detection boxes 'class cx cy w h' .* are read, not segments, "
                              "keypoints or a confidence column"),
    ("0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5", "line 2: 9 fields; only detection boxes"),
    ("3 0.5 0.5 0.2 0.2", r"line 2: class index 3 is not in 'names' of .*data.yaml \(0..2\)"),
    ("-1 0.5 0.5 0.2 0.2", r"line 2: class index -1 is not in 'names'"),
    ("1.5 0.5 0.5 0.2 0.2", "line 2: class '1.5' is not an integer"),
    ("cat 0.5 0.5 0.2 0.2", "line 2: class 'cat' is not a number"),
    ("0 0.5 abc 0.2 0.2", "line 2: cy 'abc' is not a number"),
    ("0 0.5 0.5 nan 0.2", "line 2: w 'nan' is not a finite number"),
])
def test_bad_label_lines_name_the_file_and_line(tiny, line, msg):
    tiny(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DataError, match=r"labels.train.a\.txt: " + msg):
        read(tiny.yaml)


def test_blank_lines_are_skipped_and_counted_in_line_numbers(tiny):
    tiny("\n1 0.5 0.5 0.2 0.2\n   \n1.0 0.5 0.5 0.2 0.2\n\n")
    assert read(tiny.yaml).records[0].labels.tolist() == [1, 1]  # "1.0" is class 1
    tiny("\n\n0 0.5 0.5\n")
    with pytest.raises(DataError, match="a.txt: line 3: 3 fields"):
        read(tiny.yaml)


def test_images_without_label_files_and_empty_label_files_have_no_objects(tiny):
    tiny("")  # a.txt empty, b.png without a label file
    logs = []
    ds = read(tiny.yaml, log=logs.append)
    assert [len(r.boxes) for r in ds.records] == [0, 0]
    assert ds.images_without_labels == [str(tiny.root / "images" / "train" / "b.png")]
    assert any("1 of 2 images have no label file (read as images without objects)" in m and "b.txt" in m
               for m in logs), logs
    img, target, meta = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_label_files_without_an_image_are_listed_as_orphans(tiny):
    tiny("0 0.5 0.5 0.2 0.2\n")
    ghost = tiny("9 bad line\n", stem="ghost")  # never parsed: it has no image
    nested = tiny("0 0.5 0.5 0.2 0.2\n", stem=os.path.join("sub", "ghost2"))
    logs = []
    ds = read(tiny.yaml, log=logs.append)
    assert len(ds) == 2 and ds.orphan_labels == [str(ghost), str(nested)]
    assert any("2 label files without an image, not read" in m and "ghost.txt" in m for m in logs), logs
    # beside a list file's images, the label of an image the list leaves out is not an orphan
    (tiny.root / "only_a.txt").write_text("images/train/a.jpg\n")
    yml = write_yaml(tiny.root / "l.yaml", "train: only_a.txt\nnames: [cat, dog, bird]\n")
    tiny("0 0.5 0.5 0.2 0.2\n", stem="b")
    ds = read(yml)
    assert len(ds) == 1 and ds.orphan_labels == [str(ghost)]


def test_corrupt_image_is_named_when_loaded(tiny):
    (tiny.root / "images" / "train" / "a.jpg").write_bytes(b"not an image")
    tiny("0 0.5 0.5 0.2 0.2\n")
    ds = read(tiny.yaml)  # kept, so that --bad-images skip can skip it like a corrupt VOC or COCO image
    assert ds.records[0].width == 0 and len(ds.records[0].boxes) == 0
    with pytest.raises(DataError, match=r"a.jpg: corrupt or unreadable image"):
        ds[0]
    ds.skip_bad = True
    assert type(ds[0]).__name__ == "BadSample"


def test_exif_rotated_images_are_named_and_read_upright(tiny):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (64, 48)).save(tiny.root / "images" / "train" / "a.jpg", exif=exif)
    logs = []
    ds = read(tiny.yaml, log=logs.append)
    assert (ds.records[0].width, ds.records[0].height) == (48, 64)  # upright, as load_image reads it (Ultralytics)
    assert ds.exif_rotated == [str(tiny.root / "images" / "train" / "a.jpg")]
    assert any("1 image carries an EXIF orientation: read upright" in m for m in logs), logs


def test_max_images_takes_the_first_in_path_order(tiny):
    tiny("0 0.5 0.5 0.2 0.2\n", stem="b")
    ds = read(tiny.yaml, max_images=1)
    assert [os.path.basename(r.file) for r in ds.records] == ["a.jpg"]


# ---------------------------------------------------------------------------------------------- fa-train

def test_fa_train_one_epoch_on_a_yolo_dataset(shapes_devkit, tmp_path):
    from click.testing import CliRunner

    from fa_train.checkpoint import load_checkpoint
    from fa_train.cli import main

    root = tmp_path / "shapes_yolo"
    for split, n in (("train", 8), ("test", 4)):
        records, _ = read_voc(shapes_devkit, parse_sets(f"shapes:{split}"), SHAPES_CLASSES, max_images=n)
        voc_to_yolo(records, SHAPES_CLASSES, str(root), split)
    names = ", ".join(f"{i}: {n}" for i, n in enumerate(SHAPES_CLASSES))
    yml = write_yaml(root / "data.yaml", f"path: .\ntrain: images/train\nval: images/test\nnames: {{{names}}}\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", f"yolo:{yml}", "--img-size", "64", "--batch-size", "4", "--width-mult",
                                  "0.125", "--depth-mult", "0.2", "--workers", "0", "--quiet", "--warmup-iters", "2",
                                  "--lr", "0.001", "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "clean AP50" in r.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["clean"]["images"] == 4
    ck = load_checkpoint(str(out / "last.pt"))
    assert ck["class_names"] == list(SHAPES_CLASSES) and ck["config"]["data"]["spec"] == f"yolo:{yml}"
