"""A check with nothing to measure says INCONCLUSIVE and exits 1, never PASS: a model that detects nothing cannot
show gradient masking, and a deployment cannot lose what its source never had."""
import json

import torch
from click.testing import CliRunner

from fa_deploy.bench_cli import main as bench_main
from fa_deploy.export_cli import export_main

COMMON = ["--test-split", "shapes:train", "--max-images", "2", "--batch-size", "2", "--workers", "0", "--quiet"]


def _blind_copy(overfit, path):
    """The overfit model with every objectness bias at -30: it detects nothing, by construction."""
    ckpt = torch.load(str(overfit), map_location="cpu", weights_only=False)
    state = ckpt["model"]
    na = 3
    for k in [k for k in state if k.endswith("pred.bias")]:
        b = state[k].view(na, -1).clone()
        b[:, 4] = -30.0
        state[k] = b.view(-1)
    torch.save(ckpt, str(path))
    return path


def test_sanity_on_a_model_that_detects_nothing_is_inconclusive(overfit, tmp_path):
    blind = _blind_copy(overfit, tmp_path / "blind.pt")
    r = CliRunner().invoke(bench_main, ["--weights", str(blind), "--sanity", str(tmp_path / "s"), "--transfer-from",
                                        str(overfit), "--apgd-iterations", "2", "--restarts", "2", "--sanity-eps",
                                        "0.01,0.1", "--sanity-steps", "1,2", *COMMON])
    assert r.exit_code == 1, r.output
    assert "sanity: INCONCLUSIVE" in r.output and "below --min-clean-ap 0.05" in r.output
    assert "PASS" not in r.output.split("sanity:")[-1]
    out = json.loads((tmp_path / "s" / "sanity.json").read_text())
    assert out["verdict"] == "INCONCLUSIVE" and out["inconclusive"] and not out["failures"]
    assert {row["result"] for row in out["rows"]} == {"INCONCLUSIVE"}
    assert "verdict: INCONCLUSIVE" in (tmp_path / "s" / "sanity.md").read_text()


def test_deployment_gate_of_a_source_that_detects_nothing_is_inconclusive(overfit, tmp_path):
    (tmp_path / "blind").mkdir()
    blind = _blind_copy(overfit, tmp_path / "blind" / "last.pt")
    r = CliRunner().invoke(export_main, [str(blind), "--onnx", "fp32", "--verify-images", "2"])
    assert r.exit_code == 0, r.output
    js, rep = tmp_path / "b.json", tmp_path / "rep"
    r = CliRunner().invoke(bench_main, ["--weights", str(blind), "--backend", str(tmp_path / "blind" / "export" /
                                        "last.fp32.onnx"), "--attack", "none", "--json", str(js), "--report",
                                        str(rep), "--num-vis", "1", *COMMON])
    assert r.exit_code == 1, r.output
    assert "INCONCLUSIVE" in r.output and "nothing for a deployment to lose" in r.output
    gate = json.loads(js.read_text())["gate"]
    assert gate["verdict"] == "INCONCLUSIVE" and gate["failures"] == [] and gate["min_clean_ap"] == 0.05
    assert "<span class='inconclusive'>INCONCLUSIVE</span>" in (rep / "report.html").read_text()
    # the floor is the user's: at 0 the same numbers pass (every row equals the source's)
    r = CliRunner().invoke(bench_main, ["--weights", str(blind), "--backend", str(tmp_path / "blind" / "export" /
                                        "last.fp32.onnx"), "--attack", "none", "--min-clean-ap", "0", *COMMON])
    assert r.exit_code == 0 and ": PASS" in r.output, r.output
    r = CliRunner().invoke(bench_main, ["--weights", str(blind), "--min-clean-ap", "2", *COMMON])
    assert r.exit_code == 2 and "--min-clean-ap 2" in r.output


def test_bench_asks_cuda_for_repeatable_attacks(monkeypatch):
    """fa-bench sets what CUDA needs for repeatable attacks before any work (GPU runs: scripts/gpu_check.sh)."""
    from fa_deploy.robustness.bench import repeatable_gpu_attacks

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    import torch.utils.deterministic as tud

    was = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
           torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           tud.fill_uninitialized_memory)
    try:
        torch.backends.cudnn.benchmark = True
        got = repeatable_gpu_attacks()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert got["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" == __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"]
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = was[:2]
        torch.use_deterministic_algorithms(was[2], warn_only=was[3])
        tud.fill_uninitialized_memory = was[4]
