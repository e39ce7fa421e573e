"""fa-bench's work, apart from its command line: the robustness table of checkpoints (the paper's protocol), and
with backends the deployment harness against one source; then the files (JSON, Markdown, pictures, report).

`run_bench(settings)` returns a `BenchResult`; nothing here prints a table or exits: the command does that.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from fa_deploy.report.html import write_report
from fa_deploy.report.pictures import visualize
from fa_deploy.report.plots import drop_plot, sanity_plot, steps_plot, tradeoff_plot
from fa_deploy.report.tables import markdown_table, write_json
from fa_deploy.robustness.harness import distinct_names, DRIFT_TOLERANCE, DRIFT_TOLERANCE_BY_MODEL, gate, run_harness
from fa_deploy.robustness.threats import file_hash, load_twins
from fa_deploy.runtime.backends import BackendError, measure_latency, TorchBackend
from fa_deploy.runtime.datasets import checkpoint_data, dataset_for
from fa_deploy.runtime.loading import check_backend_source, load_backend
from fa_deploy.runtime.metadata import sha256
from fa_deploy.settings import BenchSettings


@dataclass
class BenchResult:
    title: str
    columns: List[str]
    rows: List[Dict]
    details: object = None
    failures: Optional[List[str]] = None  # deployment gate: None when no gate ran, [] when it passed
    inconclusive: List[str] = field(default_factory=list)  # why the gate could measure nothing (clean AP50 too low)
    extra: Dict = field(default_factory=dict)  # what the JSON gets beside title/columns/rows
    context: Dict = field(default_factory=dict)  # models, dataset, device: for pictures; never serialised
    tables: List[tuple] = field(default_factory=list)  # further (caption, rows, columns) after the main table
    gate_name: str = "gate"  # how the console names the verdict of `failures`
    figures: List[tuple] = field(default_factory=list)  # (caption, PNG path) already written (--sanity)

    @property
    def gate_failed(self) -> bool:
        """The command exits 1: a check failed, or it had nothing to measure."""
        return bool(self.failures) or bool(self.inconclusive)

    @property
    def verdict(self) -> Optional[str]:
        """PASS, FAIL or INCONCLUSIVE (a failure wins over nothing-to-measure); None when no gate ran."""
        if self.failures is None:
            return None
        return "FAIL" if self.failures else "INCONCLUSIVE" if self.inconclusive else "PASS"

    def verdict_text(self, sep: str = "\n  ") -> str:
        reasons = self.failures or self.inconclusive
        return self.verdict + (":" + sep + sep.join(reasons) if reasons else "")


def repeatable_gpu_attacks() -> dict:
    """What CUDA needs for attacks that repeat bit for bit on one GPU (set before the first CUDA call; harmless on
    the CPU): cuDNN's deterministic algorithms without autotuning, cuBLAS's fixed workspace, and torch's
    deterministic implementations where they exist. What stays non-deterministic on CUDA: ops whose backward adds
    with atomics and that have no deterministic kernel, chiefly torchvision's RoIAlign backward (Faster R-CNN's
    input gradients through the RoI heads) and index/scatter adds; torch warns once when one of them runs. The CPU
    is deterministic for a fixed thread count, and nothing is changed for a CPU run. Returns the settings made."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    import torch.utils.deterministic

    torch.utils.deterministic.fill_uninitialized_memory = False  # a cost, not a part of repeatability
    return {"cudnn_deterministic": True, "cudnn_benchmark": False, "deterministic_algorithms": "warn_only",
            "CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"]}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_bench(s: BenchSettings, log: Callable[[str], None] = print) -> BenchResult:
    s.validate()
    if s.device != "cpu" and _cuda_available():
        repeatable_gpu_attacks()
    if s.backends:
        return run_deployment(s, log)
    if s.sanity_dir:
        return run_sanity(s, log)
    return run_sources(s, log)


def attack_title(s: BenchSettings, source: str = "") -> str:
    """What the attack columns mean, for table titles."""
    names = s.attacks
    if names == ("none",):
        return ""
    from fa_train.adversarial.suite import PAPER_ROW_ATTACKS

    parts = []
    rows = [n for n in names if n in PAPER_ROW_ATTACKS]
    if rows:
        parts.append(f"{rows[0]} attack{source}, eps {s.eps:g}, step eps/k")
    others = [n for n in names if n not in PAPER_ROW_ATTACKS]
    if others:
        parts.append(", ".join(others) + ("" if rows else f"{source}, eps {s.eps:g}"))
    if "apgd" in names or "cwa" in names:
        parts.append(f"APGD {s.apgd_iterations} iterations x {s.restarts} restart{'s' * (s.restarts > 1)}")
    if len(names) > 1:
        parts.append("worst = the lower of the per-image largest-loss images' AP50 and every single attack's")
    return ", " + "; ".join(parts)


def tog_table(details: List[Dict], label: str = "model"):
    """(caption, rows, columns) of what each TOG attack did to the confident clean detections, or None."""
    rows = []
    for d in details:
        for attack, c in (d.get("tog") or {}).items():
            n = c["clean"]  # no confident clean detection: the fractions measure nothing ("-", as misses do)
            rows.append({label: d["name"], "attack": attack, "clean dets": c["clean"],
                         "kept": c["kept"] / n if n else None, "lost": c["lost"] / n if n else None,
                         "relabelled": c["relabelled"] / n if n else None, "fabricated": c["fabricated"],
                         "adv dets": c["adversarial"]})
    if not rows:
        return None
    cols = [label, "attack", "clean dets", "kept", "lost", "relabelled", "fabricated", "adv dets"]
    return ("TOG: confident clean detections kept / lost / relabelled (fractions), fabricated (count) at IoU 0.5",
            rows, cols)


def run_sources(s: BenchSettings, log=print) -> BenchResult:
    """One row per checkpoint: clean AP50, PGD-k AP50, advAP, acAP (or clean AP and speed with attack none).
    Under torchrun every rank evaluates its shard of the test set; rank 0 gathers, scores and writes."""
    from fa_train import distributed as D
    from fa_train.checkpoint import check_classes, display_name
    from fa_train.models import load_model
    from fa_train.engine import eval_loader, resolve_device
    from fa_train.evaluation import evaluate, robustness

    dev = resolve_device(D.init_from_env(s.device) or s.device)
    quiet = s.quiet or not D.is_main()
    say = log if D.is_main() else (lambda m: None)
    rows, details, ds, models = [], [], None, []
    for w in s.weights:
        model, ckpt = load_model(w)
        model.to(dev).eval()
        cfg = ckpt.get("config", {})
        if ds is None:
            ds = dataset_for(ckpt, "test", s.data, s.img_size, s.test_split, s.max_images, log=log)
            loader = eval_loader(ds, s.batch_size, s.workers)
        check_classes(ckpt, ds.class_names, w, ds.name)
        name = display_name(w)
        method = cfg.get("method", {}).get("name", "?")
        say(f"[{name}] {s.attack} on {ds.name} ({len(ds)} images"
            + (f", {D.world_size()} processes)" if D.world_size() > 1 else ")"))
        t0 = time.time()
        if s.attack == "none":
            res = evaluate(model, loader, dev, progress=not quiet)
            row = {"model": name, "method": method, "clean": res["AP50"], **network_latency(model, loader, dev)}
            details.append({"weights": w, "clean": res})
        else:
            res = robustness(model, loader, dev, eps=s.eps, steps=s.steps, attack=s.attacks, progress=not quiet,
                             apgd_iterations=s.apgd_iterations, restarts=s.restarts, tog_score=s.tog_score,
                             seed=s.attack_seed, attack_padding=s.attack_padding)
            row = {"model": name, "method": method, **res["row"]}
            details.append({"weights": w, "name": name, **res})
        rows.append(row)
        models.append((name, model))
        say(f"[{name}] done in {time.time() - t0:.0f} s")
    if s.attack == "none":
        columns = ["model", "method", "clean", "ms/img", "p90_ms", "img/s"]
    else:
        columns = ["model", "method"] + details[0]["columns"]
    title = f"AP50 on {ds.name}" + attack_title(s)
    tables = [t for t in [tog_table(details)] if t]
    return BenchResult(title, columns, rows, details=details, extra={"details": details}, tables=tables,
                       context={"sources": models, "backends": [], "dataset": ds, "device": dev,
                                "main": D.is_main()})


def network_latency(model, loader, device) -> Dict:
    """ms per image of the network alone (median and p90 after warm-up, on the first test batch), measured as the
    deployment harness measures every backend: not the data loading, not pycocotools."""

    images = next(iter(loader))[0].numpy()
    lat = measure_latency(TorchBackend(model, device=device), model.postprocess, images)
    return {"ms/img": lat["ms_median"], "p90_ms": lat["ms_p90"], "img/s": lat["images_per_s"]}
def run_sanity(s: BenchSettings, log=print) -> BenchResult:
    """`--sanity DIR`: the gradient-masking checks of fa_train/adversarial/sanity.py on each checkpoint; the verdict
    table (rows: checkpoint x check), the curves table, DIR/sanity.json, sanity.md and sanity_curves.png.
    `failures` names every failed check (the command exits 1)."""
    from fa_train import distributed as D
    from fa_train.adversarial.sanity import curve_rows, run_checks
    from fa_train.checkpoint import check_classes
    from fa_train.models import load_model
    from fa_train.engine import make_loader, resolve_device


    if D.env_world_size() > 1:
        from fa_train.errors import SettingsError

        raise SettingsError("--sanity runs in one process; run it without torchrun")
    dev = resolve_device(s.device)
    transfer = None
    if s.transfer_from:
        transfer, _ = load_model(s.transfer_from)
        transfer.to(dev).eval()
    restarts = s.restarts if s.restarts > 1 else 3
    rows, curve_table, failures, inconclusive, details, ds = [], [], [], [], [], None
    for w in s.weights:
        model, ckpt = load_model(w)
        model.to(dev).eval()
        if ds is None:
            ds = dataset_for(ckpt, "test", s.data, s.img_size, s.test_split, s.max_images, log=log)
            loader = make_loader(ds, s.batch_size, False, s.workers)
        check_classes(ckpt, ds.class_names, w, ds.name)
        name = os.path.basename(os.path.dirname(os.path.abspath(w))) or w
        log(f"[{name}] gradient-masking checks on {ds.name} ({len(ds)} images)")
        res = run_checks(model, loader, dev, transfer_model=transfer, eps=s.eps, iterations=s.apgd_iterations,
                         restarts=restarts, eps_grid=s.sanity_eps, steps_grid=s.sanity_steps, seed=s.attack_seed,
                         progress=not s.quiet, queries=s.sanity_queries)
        clean = res["curves"]["clean"]
        blind = clean < s.min_clean_ap
        if blind:
            inconclusive.append(f"{name}: clean AP50 {clean:.4f} is below --min-clean-ap {s.min_clean_ap:g}: there "
                                f"is nothing to attack, so the checks measure nothing")
        for c in res["checks"]:
            rows.append({"model": name, **c.as_row(), **({"result": "INCONCLUSIVE"} if blind else {})})
            if not c.passed and not blind:
                failures.append(f"{name}: {c.name}: {c.detail} (a sign of {c.sign_of})")
        curve_table.append(curve_rows(name, res["curves"]))
        details.append({"weights": w, "name": name, "curves": res["curves"],
                        "checks": [c.as_row() for c in res["checks"]]})
    columns = ["model", "check", "result", "detail", "violation is a sign of"]
    title = (f"gradient-masking checks (Carlini et al. 2019) on {ds.name}: APGD {s.apgd_iterations} iterations at "
             f"eps {s.eps:g} unless varied, uniform noise and a random search of {s.sanity_queries} queries at eps "
             f"{s.eps:g}" + (f", transfer from {s.transfer_from}" if s.transfer_from else ""))
    ccols = list(dict.fromkeys(k for r in curve_table for k in r))
    tables = [("AP50 along the curves (APGD)", curve_table, ccols)]
    os.makedirs(s.sanity_dir, exist_ok=True)
    png = sanity_plot(details, os.path.join(s.sanity_dir, "sanity_curves.png"))
    verdict = "FAIL" if failures else "INCONCLUSIVE" if inconclusive else "PASS"
    write_json({"title": title, "columns": columns, "rows": rows, "verdict": verdict, "failures": failures,
                "inconclusive": inconclusive, "min_clean_ap": s.min_clean_ap, "details": details},
               os.path.join(s.sanity_dir, "sanity.json"))
    with open(os.path.join(s.sanity_dir, "sanity.md"), "w") as f:
        f.write(f"{title}\n\n{markdown_table(rows, columns)}\n\n{tables[0][0]}\n\n"
                f"{markdown_table(curve_table, ccols)}\n\nverdict: {verdict}\n\n"
                f"![AP50 against eps and steps](sanity_curves.png)\n")
    return BenchResult(title, columns, rows, details=details, failures=failures, inconclusive=inconclusive,
                       extra={"details": details, "verdict": verdict, "inconclusive": inconclusive},
                       tables=tables, gate_name="sanity", figures=[("AP50 against eps and against steps (APGD)",
                                                                    png)],
                       context={"sources": [], "backends": [], "dataset": ds, "device": dev, "main": True})


VERIFY_IMAGES = 8  # test images a twin is verified on (and the same with uniform noise at --eps)


def run_deployment(s: BenchSettings, log=print) -> BenchResult:
    """The harness: every backend on the same clean images and on the adversarial images of each threat (from the
    source weights; from the backend's verified twin: white-box and differential), the gate on the worst case."""
    from fa_train import distributed as D
    from fa_train.checkpoint import check_classes
    from fa_train.models import load_model
    from fa_train.engine import make_loader, resolve_device
    from fa_train.evaluation import robustness_columns


    if D.env_world_size() > 1:
        raise BackendError("--backend runs in one process (the exported models are not sharded); "
                           "run it without torchrun")
    weights = s.weights[0]
    dev = resolve_device(s.device)
    model, ckpt = load_model(weights)
    model.to(dev).eval()
    _, size, _ = checkpoint_data(ckpt, s.data, s.img_size)
    wsha = sha256(weights)
    loaded = [load_backend(b, list(s.providers) or None, s.allow_cpu_fallback) for b in s.backends]
    for path, bk in zip(s.backends, loaded):
        check_backend_source(bk, path, model, weights, wsha, size, s.cross_model,
                             lambda m: log(f"fa-bench: {m}"))
    ds = dataset_for(ckpt, "test", s.data, size, s.test_split, s.max_images, log=log)
    check_classes(ckpt, ds.class_names, weights, ds.name)
    loader = make_loader(ds, s.batch_size, False, s.workers)
    check_backend_outputs(model, loaded, s.backends, ds, dev)
    names = distinct_names(list(s.backends))
    threats = s.threats
    twins, hashes = None, None
    if any(t != "transfer" for t in threats):
        import torch

        verify = torch.stack([ds[i][0] for i in range(min(VERIFY_IMAGES, len(ds)))])
        log(f"threats {', '.join(threats)}: building the differentiable twin of each backend and verifying it "
            f"against ONNX Runtime")
        twins = load_twins(s.backends, names, verify, dev, log=log, eps=s.eps)
        hashes = [file_hash(b) for b in s.backends]
    res = run_harness(model, loaded, loader, dev, s.eps, s.steps, s.attacks, s.cache_dir, wsha,
                      progress=not s.quiet, source_path=weights, apgd_iterations=s.apgd_iterations,
                      restarts=s.restarts, tog_score=s.tog_score, seed=s.attack_seed, threats=threats, twins=twins,
                      backend_hashes=hashes, diff_weight=s.diff_weight, detect_score=s.detect_score,
                      attack_padding=s.attack_padding)
    none = s.attacks == ("none",)
    ap_cols = ["clean"] + ([] if none else robustness_columns(s.attacks, s.steps))
    drops = [k for k in res["rows"][0] if k.startswith("drop_")]
    misses = ["misses_clean"] + ([] if none else ["misses_adv"])
    columns = ["backend", *([] if none else ["threat"]), "format", "precision", "provider", "size_MB", *ap_cols,
               *drops, *misses, "drift_clean", *([] if none else ["drift_adv"]), "ms/img", "p90_ms", "img/s",
               "pre_ms", "post_ms"]
    title = f"AP50 on {ds.name}" + attack_title(s, " from the source weights" if threats == ("transfer",) else "")
    if not none:
        title += f"; threats: {', '.join(threats)}" + (f" (differential weight {s.diff_weight:g})"
                                                       if "differential" in threats else "")
    model_name = model.arch_config().get("name")
    failures = gate(res["rows"], s.max_drop, s.max_deploy_misses, s.max_drift, drift_gate=True, model=model_name)
    src_clean = res["rows"][0]["clean"]
    inconclusive = [] if src_clean >= s.min_clean_ap else [
        f"the source's clean AP50 {src_clean:.4f} is below --min-clean-ap {s.min_clean_ap:g}: there is nothing for a "
        f"deployment to lose, so the gate measures nothing"]
    verdict = "FAIL" if failures else "INCONCLUSIVE" if inconclusive else "PASS"
    extra = {k: v for k, v in res.items() if k != "rows"}
    extra["gate"] = {"max_drop": s.max_drop, "max_deploy_misses": s.max_deploy_misses, "max_drift": s.max_drift,
                     "max_drift_defaults": dict(DRIFT_TOLERANCE_BY_MODEL.get(model_name, DRIFT_TOLERANCE)),
                     "min_clean_ap": s.min_clean_ap, "verdict": verdict, "failures": failures,
                     "inconclusive": inconclusive}
    gate_name = f"gate (max drop {s.max_drop}" + (f", max deployment-only misses {s.max_deploy_misses:.0%}"
                                                  if s.max_deploy_misses is not None else "") + \
        (f", max drift {s.max_drift:g}" if s.max_drift is not None else ", max drift per precision") + \
        (", worst case over threats)" if len(threats) > 1 else ")")
    return BenchResult(title, columns, res["rows"], details=res.get("details"), failures=failures,
                       inconclusive=inconclusive, extra=extra, gate_name=gate_name,
                       context={"sources": [("source", model)], "backends": list(zip(names, loaded)),
                                "dataset": ds, "device": dev, "main": True})


def check_backend_outputs(model, backends, paths, dataset, device) -> None:
    """One test image through the source and each backend: the raw outputs must agree in number and shape (a file
    of another architecture, class count or a part of a split deployment is refused before the benchmark)."""
    import numpy as np


    x = dataset[0][0][None].numpy().astype(np.float32)
    ref = TorchBackend(model, device=device).raw(x)
    want = [tuple(r.shape) for r in ref]
    for path, b in zip(paths, backends):
        try:
            out = b.raw(x)
        except BackendError:
            raise
        except Exception as e:  # noqa: BLE001  (ONNX Runtime / TensorRT errors come in many types)
            raise BackendError(f"{path}: cannot run it on a {list(x.shape)} image batch "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        got = [tuple(np.asarray(o).shape) for o in out]
        if got != want:
            raise BackendError(f"{path}: its outputs {got} do not match the source's {want}: exported from another "
                               f"architecture or class count, or a part of a split deployment (pass its "
                               f".pipeline.json)")


def write_outputs(result: BenchResult, s: BenchSettings, log=print) -> List[str]:
    """The JSON, Markdown, pictures and report the settings ask for; returns the paths written."""
    written = []
    gated = result.failures is not None
    if s.md_path:
        with open(s.md_path, "w") as f:
            f.write(f"{result.title}\n\n{markdown_table(result.rows, result.columns)}\n")
            for caption, rows, columns in result.tables:
                f.write(f"\n{caption}\n\n{markdown_table(rows, columns)}\n")
            if gated:
                f.write(f"\n{result.gate_name}: {result.verdict_text('; ')}\n")
        written.append(s.md_path)
    if s.json_path:
        write_json({"title": result.title, "columns": result.columns, "rows": result.rows, **result.extra},
                   s.json_path)
        written.append(s.json_path)
    if s.vis_dir or s.report_dir:
        written += _pictures_and_report(result, s, log)
    return written


def _pictures_and_report(result: BenchResult, s: BenchSettings, log) -> List[str]:
    from fa_train.evaluation import attack_loss_keys


    ctx = result.context
    sources, backends, ds, dev = ctx["sources"], ctx["backends"], ctx["dataset"], ctx["device"]
    out = s.vis_dir or os.path.join(s.report_dir, "detections")
    domain = [n for n in s.attacks if n in ("cls", "loc")]  # the pictures show PGD-1 of the paper-row attack
    paths = []
    if sources:
        keys = attack_loss_keys(sources[0][1], domain[0]) if domain else None
        paths = visualize(sources, ds, out, dev, num_images=s.num_vis, eps=s.eps, backends=backends,
                          attack_keys=keys, log=log)
    figs = [(f"{os.path.basename(p)}: clean and PGD-1 (eps {s.eps:g}); green boxes predicted, white dashed ground "
             f"truth; heat map: Grad-CAM of the aligned layer through the detection loss", p) for p in paths]
    if not s.report_dir:
        return paths

    rd = s.report_dir
    os.makedirs(rd, exist_ok=True)
    plots = []
    if backends:
        label, title = "backend", "fa-bench: deployment report"
        verdict_line = (result.gate_name, result.verdict, "; ".join(result.failures or result.inconclusive))
        plots.append(("drop of each backend against the source",
                      drop_plot(result.rows, os.path.join(rd, "deploy_drop.png"), s.max_drop)))
    elif result.gate_name == "sanity":
        label, title = "model", "fa-bench: gradient-masking checks"
        verdict_line = ("sanity checks", result.verdict, "; ".join(result.failures or result.inconclusive))
    else:
        label, title, verdict_line = "model", "fa-bench: robustness report", None
    plots += list(result.figures)
    per = " per backend" if backends else ""
    rows = result.rows if result.gate_name != "sanity" else []
    if rows and "advAP" in rows[0]:
        plots += [(f"clean AP50 against advAP{per}, dotted lines of equal acAP",
                   tradeoff_plot(rows, os.path.join(rd, "tradeoff.png"), label)),
                  (f"AP50 against PGD steps{per}", steps_plot(rows, s.steps, os.path.join(rd, "steps.png"), label))]
    if rows and "worst" in rows[0]:
        plots.append((f"clean AP50 against the worst case over attacks{per}, dotted lines of equal (clean + worst)/2",
                      tradeoff_plot(rows, os.path.join(rd, "tradeoff_worst.png"), label, y_key="worst")))
    tables = [(result.title, result.rows, result.columns)] + list(result.tables)
    rep = write_report(rd, title, tables, plots + figs, verdict=verdict_line)
    log(f"report: {rep['html']} and {rep['markdown']}")
    return paths + [rep["html"], rep["markdown"]]
