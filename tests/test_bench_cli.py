"""fa-bench and fa-export as a new user meets them (issue 14, deployment side): files with the same name kept
apart, the adversarial-image cache keyed on the images, the source of an exported file checked, every bad flag
and unwritable output refused before any work with exit code 2 (never the gate's 1), network-only latency."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import broken_copy
from fa_deploy.bench_cli import main as bench_main
from fa_deploy.export_cli import export_main
from fa_deploy.robustness.harness import _cache_key, _load_cached, distinct_names

COMMON = ["--test-split", "shapes:train", "--max-images", "2", "--batch-size", "2", "--workers", "0", "--quiet",
          "--threat", "transfer"]  # the white-box and differential threats: test_threats.py


def _bench(*args):
    return CliRunner().invoke(bench_main, list(args))


def test_backends_with_the_same_file_name_are_kept_apart(overfit, exported, tmp_path):
    """Two exports are both called last.fp32.onnx: each row must hold its own file's detections (they were merged
    under the base name, so a broken file and a good one showed the same AP)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(exported["fp32"], a / "last.fp32.onnx")
    shutil.copy(str(exported["fp32"]) + ".json", a / "last.fp32.onnx.json")
    broken_copy(exported["fp32"], b / "last.fp32.onnx")
    js = tmp_path / "t.json"
    r = _bench("--weights", str(overfit), "--backend", str(a / "last.fp32.onnx"), "--backend",
               str(b / "last.fp32.onnx"), "--steps", "1", "--json", str(js), "--max-drop", "1", "--max-deploy-misses",
               "1", "--max-drift", "1e9", *COMMON)  # the rows, not the gate (the drift gate fails b: test_verdict.py)
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [row["backend"] for row in rows] == ["source", "a/last.fp32.onnx", "b/last.fp32.onnx"]
    src, good, bad = rows
    assert good["clean"] == pytest.approx(src["clean"], abs=1e-3) and good["drift_clean"] < 1e-3
    assert bad["clean"] < src["clean"] - 0.1 and bad["drift_clean"] > 0.01
    # each row as the file alone gives it
    js1 = tmp_path / "one.json"
    r = _bench("--weights", str(overfit), "--backend", str(b / "last.fp32.onnx"), "--steps", "1", "--json",
               str(js1), "--max-drop", "1", "--max-deploy-misses", "1", "--max-drift", "1e9", *COMMON)
    assert r.exit_code == 0, r.output
    assert json.loads(js1.read_text())["rows"][1]["clean"] == pytest.approx(bad["clean"], abs=1e-9)


def test_distinct_names():
    assert distinct_names(["/x/a/last.fp32.onnx", "/x/b/last.fp32.onnx", "/x/a/last.int8.onnx"]) == \
        ["a/last.fp32.onnx", "b/last.fp32.onnx", "last.int8.onnx"]
    assert distinct_names(["/r/p/e/m.onnx", "/r/q/e/m.onnx"]) == ["p/e/m.onnx", "q/e/m.onnx"]


class _DS:
    def __init__(self, name, size):
        self.name, self.img_size = name, size


def test_cache_key_covers_everything_that_makes_the_images(tmp_path):
    base = _cache_key("sha", _DS("synth:60:shapes:test", 128), "pgd", 0.03, 1, [1, 2])
    assert base != _cache_key("sha", _DS("synth:60:shapes:test", 160), "pgd", 0.03, 1, [1, 2])  # image size
    assert base != _cache_key("sha", _DS("synth:60:shapes:train", 128), "pgd", 0.03, 1, [1, 2])  # split
    assert base != _cache_key("sha", _DS("synth:60:shapes:test", 128), "pgd", 0.03, 1, [1, 3])  # images
    assert base != _cache_key("sha", _DS("synth:60:shapes:test", 128), "cls", 0.03, 1, [1, 2])
    assert base != _cache_key("sha", _DS("synth:60:shapes:test", 128), "pgd", 0.03, 3, [1, 2])
    assert base != _cache_key("other", _DS("synth:60:shapes:test", 128), "pgd", 0.03, 1, [1, 2])
    assert base == _cache_key("sha", _DS("synth:60:shapes:test", 128), "pgd", 0.03, 1, [1, 2])
    p = tmp_path / base
    np.save(p, np.zeros((2, 3, 64, 64), np.float32))
    assert _load_cached(str(p), (2, 3, 64, 64)).shape == (2, 3, 64, 64)
    assert _load_cached(str(p), (2, 3, 96, 96)) is None  # another shape: regenerated (said on stderr)
    p.write_bytes(p.read_bytes()[:100])
    assert _load_cached(str(p), (2, 3, 64, 64)) is None  # truncated: regenerated (tests/test_new_user.py)


def test_cache_reused_only_for_the_same_images(overfit, exported, tmp_path):
    cache = tmp_path / "cache"
    args = ["--weights", str(overfit), "--backend", str(exported["fp32"]), "--steps", "1", "--cache-dir", str(cache),
            "--max-drop", "1", "--min-clean-ap", "0", "--threat", "transfer"]  # the cache, not the gate
    r = _bench(*args, *COMMON)
    assert r.exit_code == 0, r.output
    assert len(os.listdir(cache)) == 1
    r = _bench(*args, *COMMON)  # the same images: reused
    assert r.exit_code == 0, r.output and len(os.listdir(cache)) == 1
    r = _bench(*args, "--test-split", "shapes:test", "--max-images", "2", "--batch-size", "2", "--workers", "0",
               "--quiet")
    assert r.exit_code == 0, r.output
    assert len(os.listdir(cache)) == 2  # other images: a batch of their own


def test_exported_from_other_weights_is_an_error_whatever_the_sidecar(overfit, exported, tmp_path):
    """The source hash lives in the ONNX file itself: with the sidecar deleted, a file exported from other weights is
    still refused (it was scored against the wrong source, precision '?', gate PASS); --cross-model compares anyway."""
    import onnx

    from fa_deploy.runtime.metadata import onnx_metadata, set_onnx_metadata

    m = onnx.load(str(exported["int8"]))
    meta = onnx_metadata(m)
    assert meta["source_sha256"] and meta["precision"] == "int8"
    other = tmp_path / "m.int8.onnx"  # as if exported from another checkpoint; no sidecar
    set_onnx_metadata(m, {**meta, "source_sha256": "0" * 64, "source_weights": "/elsewhere/last.pt"})
    onnx.save(m, str(other))
    r = _bench("--weights", str(overfit), "--backend", str(other), "--attack", "none", *COMMON)
    assert r.exit_code == 2 and "exported from other weights" in r.output and "--cross-model" in r.output, r.output
    assert "/elsewhere/last.pt" in r.output and "Traceback" not in r.output
    js = tmp_path / "x.json"
    r = _bench("--weights", str(overfit), "--backend", str(other), "--attack", "none", "--cross-model", "--max-drop",
               "1", "--json", str(js), *COMMON)
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["rows"][1]["precision"] == "int8"  # from the file itself, not '?'
    # a sidecar that contradicts the file's own record belongs to another file
    shutil.copy(str(exported["int8"]) + ".json", str(other) + ".json")
    r = _bench("--weights", str(overfit), "--backend", str(other), "--attack", "none", "--cross-model", *COMMON)
    assert r.exit_code == 2 and "the sidecar belongs to another file" in r.output, r.output
    # no record at all (another tool's file): refused unless --cross-model
    os.remove(str(other) + ".json")
    del m.metadata_props[:]
    onnx.save(m, str(other))
    r = _bench("--weights", str(overfit), "--backend", str(other), "--attack", "none", *COMMON)
    assert r.exit_code == 2 and "no record of the weights" in r.output, r.output


def test_bad_flags_exit_2_naming_the_flag_before_any_work(overfit, tmp_path):
    cases = [(["--max-images", "0"], "--max-images 0"), (["--eps", "-0.03"], "--eps -0.03"),
             (["--batch-size", "0"], "--batch-size 0"), (["--data", "synth:abc"], "synth:abc"),
             (["--img-size", "100"], "--img-size 100"), (["--json", "/proc/nope/t.json"], "--json /proc/nope/t.json"),
             (["--markdown", "/proc/nope/t.md"], "--markdown"), (["--report", "/proc/nope"], "--report /proc/nope"),
             (["--steps", "0"], "--steps")]
    for extra, needle in cases:
        r = _bench("--weights", str(overfit), *extra, "--quiet")
        assert r.exit_code == 2, (extra, r.output)
        assert needle in r.output and "Traceback" not in r.output, (extra, r.output)
        assert " on synth" not in r.output, extra  # refused before the benchmark started, not after it
    r = _bench("--weights", str(tmp_path / "missing.pt"))
    assert r.exit_code == 2 and "missing.pt" in r.output


def test_export_bad_flags_and_unwritable_out_exit_2(overfit, tmp_path):
    for extra, needle in [(["--out", "/proc/nope"], "--out /proc/nope"), (["--batch", "0"], "--batch 0"),
                          (["--verify-images", "0"], "--verify-images 0"), (["--img-size", "100"], "--img-size 100"),
                          (["--calib-images", "0"], "--calib-images 0")]:
        r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert needle in r.output and "Traceback" not in r.output, (extra, r.output)


def test_export_static_batch_not_dividing_the_verify_images(overfit, tmp_path):
    r = CliRunner().invoke(export_main, [str(overfit), "--onnx", "fp32", "--batch", "3", "--verify-images", "8",
                                         "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "last.fp32.onnx.json").read_text())
    assert side["parity"]["passed"]
    assert "on 8 images" in r.output


def test_part_file_of_a_split_deployment_says_pass_the_manifest(overfit, tmp_path):
    part = tmp_path / "last.fp32.backbone.onnx"
    part.write_bytes(b"\x08\x07")
    r = _bench("--weights", str(overfit), "--backend", str(part), *COMMON)
    assert r.exit_code == 2 and "last.fp32.pipeline.json" in r.output, r.output


def test_attack_none_latency_is_the_network(overfit, tmp_path):
    js = tmp_path / "n.json"
    r = _bench("--weights", str(overfit), "--attack", "none", "--json", str(js), "--workers", "1", *COMMON[:4],
               "--quiet")
    assert r.exit_code == 0, r.output
    row = json.loads(js.read_text())["rows"][0]
    assert {"ms/img", "p90_ms", "img/s"} <= set(row)
    # median and p90 of the network alone (measure_latency, as the harness measures backends), not wall time with
    # worker start-up and pycocotools
    assert 0 < row["ms/img"] <= row["p90_ms"] and row["img/s"] == pytest.approx(1000 / row["ms/img"])
