"""Without the optional extra: `--model ultralytics:...` is one clear line naming the extra (the rest of the project
never imports Ultralytics). Runs whether or not Ultralytics is installed (its absence is simulated)."""
import sys

from click.testing import CliRunner


def test_model_ultralytics_without_the_extra_says_how_to_install_it(monkeypatch, tmp_path):
    from fa_train.cli import main as train_main

    for name in [m for m in sys.modules if m == "ultralytics" or m.startswith("ultralytics.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics -> ImportError
    r = CliRunner().invoke(train_main, ["--model", "ultralytics:yolov8n.yaml", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[ultralytics]'" in lines[0] and "AGPL-3.0" in lines[0], lines
    assert not (tmp_path / "run").exists()
    # the registry and the other models do not need it
    from fa_train.models import available_models, create_model

    assert "ultralytics" in available_models()
    create_model("yolov3", 2, width_mult=0.125, depth_mult=0.2)
