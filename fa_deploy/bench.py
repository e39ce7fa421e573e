"""fa-bench's work, apart from its command line: the robustness table of checkpoints (the paper's protocol), and
with backends the deployment harness against one source; then the files (JSON, Markdown, pictures, report).

`run_bench(settings)` returns a `BenchResult`; nothing here prints a table or exits: the command does that.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .settings import BenchSettings


@dataclass
class BenchResult:
    title: str
    columns: List[str]
    rows: List[Dict]
    details: object = None
    failures: Optional[List[str]] = None  # deployment gate: None when no gate ran, [] when it passed
    extra: Dict = field(default_factory=dict)  # what the JSON gets beside title/columns/rows
    context: Dict = field(default_factory=dict)  # models, dataset, device: for pictures; never serialised

    @property
    def gate_failed(self) -> bool:
        return bool(self.failures)


def checkpoint_data(ckpt: dict, data=None, img_size=None):
    """(data spec, image size, synth seed): the flags when given, else what the checkpoint was trained on."""
    dcfg = ckpt.get("config", {}).get("data", {})
    return data or dcfg.get("spec", "synth"), img_size or dcfg.get("img_size", 416), dcfg.get("synth_seed", 0)


def dataset_for(ckpt: dict, role: str, data=None, img_size=None, split=None, max_images=None, log=print):
    from fa_train.data import build_dataset

    spec, size, seed = checkpoint_data(ckpt, data, img_size)
    return build_dataset(spec, role, size, split, max_images, seed, log=log)


def run_bench(s: BenchSettings, log: Callable[[str], None] = print) -> BenchResult:
    s.validate()
    if s.backends:
        return run_deployment(s, log)
    return run_sources(s, log)


def run_sources(s: BenchSettings, log=print) -> BenchResult:
    """One row per checkpoint: clean AP50, PGD-k AP50, advAP, acAP (or clean AP and speed with attack none).
    Under torchrun every rank evaluates its shard of the test set; rank 0 gathers, scores and writes."""
    from fa_train import distributed as D
    from fa_train.checkpoint import check_classes, load_model
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
        name = os.path.basename(os.path.dirname(os.path.abspath(w))) or w
        method = cfg.get("method", {}).get("name", "?")
        say(f"[{name}] {s.attack} on {ds.name} ({len(ds)} images"
            + (f", {D.world_size()} processes)" if D.world_size() > 1 else ")"))
        t0 = time.time()
        if s.attack == "none":
            res = evaluate(model, loader, dev, progress=not quiet)
            row = {"model": name, "method": method, "clean": res["AP50"],
                   "ms/img": 1000 * res["seconds"] / max(res["images"], 1)}
            details.append({"weights": w, "clean": res})
        else:
            res = robustness(model, loader, dev, eps=s.eps, steps=s.steps, attack=s.attack, progress=not quiet)
            row = {"model": name, "method": method, **res["row"]}
            details.append({"weights": w, **res})
        rows.append(row)
        models.append((name, model))
        say(f"[{name}] done in {time.time() - t0:.0f} s")
    if s.attack == "none":
        columns = ["model", "method", "clean", "ms/img"]
    else:
        columns = ["model", "method", "clean"] + [f"PGD-{k}" for k in s.steps] + ["advAP", "acAP"]
    title = f"AP50 on {ds.name}" + ("" if s.attack == "none" else f", {s.attack} attack, eps {s.eps:g}, step eps/k")
    return BenchResult(title, columns, rows, details=details, extra={"details": details},
                       context={"sources": models, "backends": [], "dataset": ds, "device": dev,
                                "main": D.is_main()})


def run_deployment(s: BenchSettings, log=print) -> BenchResult:
    """The harness: adversarial images from the source weights, every backend on the same images, the gate."""
    from fa_train import distributed as D
    from fa_train.checkpoint import check_classes, load_model
    from fa_train.engine import make_loader, resolve_device

    from .backends import BackendError
    from .export import sha256
    from .harness import gate, run_harness
    from .loading import load_backend

    if D.env_world_size() > 1:
        raise BackendError("--backend runs in one process (the exported models are not sharded); "
                           "run it without torchrun")
    weights = s.weights[0]
    dev = resolve_device(s.device)
    model, ckpt = load_model(weights)
    model.to(dev).eval()
    _, size, _ = checkpoint_data(ckpt, s.data, s.img_size)
    wsha = sha256(weights)
    loaded = []
    for b in s.backends:
        bk = load_backend(b, list(s.providers) or None, s.allow_cpu_fallback)
        side = getattr(bk, "sidecar", None) or {}
        if side.get("source_sha256") and side["source_sha256"] != wsha:
            log(f"fa-bench: warning: {b} was exported from other weights ({side.get('source_weights')})")
        shape = side.get("input", {}).get("shape")
        if shape and shape[-1] != size:
            raise BackendError(f"{b}: exported for {shape[-1]} px input, the benchmark uses {size} px")
        loaded.append(bk)
    ds = dataset_for(ckpt, "test", s.data, size, s.test_split, s.max_images, log=log)
    check_classes(ckpt, ds.class_names, weights, ds.name)
    loader = make_loader(ds, s.batch_size, False, s.workers)
    res = run_harness(model, loaded, loader, dev, s.eps, s.steps, s.attack, s.cache_dir, wsha,
                      progress=not s.quiet, source_path=weights)
    attack = s.attack
    ap_cols = ["clean"] + ([] if attack == "none" else [f"PGD-{k}" for k in s.steps] + ["advAP", "acAP"])
    drops = ["drop_clean"] + ([] if attack == "none" else ["drop_advAP"])
    columns = ["backend", "format", "precision", "provider", "size_MB", *ap_cols, *drops, "drift_clean",
               *([] if attack == "none" else ["drift_adv"]), "ms/img", "p90_ms", "img/s", "pre_ms", "post_ms"]
    title = (f"AP50 on {ds.name}" + ("" if attack == "none" else
                                      f", {attack} attack from the source weights, eps {s.eps:g}, step eps/k"))
    failures = gate(res["rows"], s.max_drop)
    extra = {k: v for k, v in res.items() if k != "rows"}
    extra["gate"] = {"max_drop": s.max_drop, "failures": failures}
    return BenchResult(title, columns, res["rows"], details=res.get("details"), failures=failures, extra=extra,
                       context={"sources": [("source", model)], "backends": [(b.name, b) for b in loaded],
                                "dataset": ds, "device": dev, "main": True})


def verdict(result: BenchResult, max_drop: float) -> str:
    return "PASS" if not result.failures else "FAIL:\n  " + "\n  ".join(result.failures)


def write_outputs(result: BenchResult, s: BenchSettings, log=print) -> List[str]:
    """The JSON, Markdown, pictures and report the settings ask for; returns the paths written."""
    from .report import markdown_table, write_json

    written = []
    gated = result.failures is not None
    if s.md_path:
        with open(s.md_path, "w") as f:
            f.write(f"{result.title}\n\n{markdown_table(result.rows, result.columns)}\n")
            if gated:
                f.write(f"\ngate (max drop {s.max_drop}): {'PASS' if not result.failures else 'FAIL'}\n")
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

    from .visualize import visualize

    ctx = result.context
    sources, backends, ds, dev = ctx["sources"], ctx["backends"], ctx["dataset"], ctx["device"]
    out = s.vis_dir or os.path.join(s.report_dir, "detections")
    keys = None if s.attack in ("pgd", "none") else attack_loss_keys(sources[0][1], s.attack)
    paths = visualize(sources, ds, out, dev, num_images=s.num_vis, eps=s.eps, backends=backends, attack_keys=keys,
                      log=log)
    figs = [(f"{os.path.basename(p)}: clean and PGD-1 (eps {s.eps:g}); green boxes predicted, white dashed ground "
             f"truth; heat map: Grad-CAM of the aligned layer through the detection loss", p) for p in paths]
    if not s.report_dir:
        return paths
    from .html_report import write_report
    from .plots import drop_plot, steps_plot, tradeoff_plot

    rd = s.report_dir
    os.makedirs(rd, exist_ok=True)
    plots = []
    if backends:
        label, title, verdict_line = "backend", "fa-bench: deployment report", \
            f"{'PASS' if not result.failures else 'FAIL'} (max drop {s.max_drop})"
        plots.append(("drop of each backend against the source",
                      drop_plot(result.rows, os.path.join(rd, "deploy_drop.png"), s.max_drop)))
    else:
        label, title, verdict_line = "model", "fa-bench: robustness report", ""
    if s.attack != "none":
        per = " per backend" if backends else ""
        plots += [(f"clean AP50 against advAP{per}, dotted lines of equal acAP",
                   tradeoff_plot(result.rows, os.path.join(rd, "tradeoff.png"), label)),
                  (f"AP50 against PGD steps{per}", steps_plot(result.rows, s.steps, os.path.join(rd, "steps.png"),
                                                              label))]
    rep = write_report(rd, title, [(result.title, result.rows, result.columns)], plots + figs, verdict=verdict_line)
    log(f"report: {rep['html']} and {rep['markdown']}")
    return paths + [rep["html"], rep["markdown"]]
