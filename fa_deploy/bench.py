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
    from fa_train.checkpoint import check_classes, display_name, load_model
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
            res = robustness(model, loader, dev, eps=s.eps, steps=s.steps, attack=s.attack, progress=not quiet)
            row = {"model": name, "method": method, **res["row"]}
            details.append({"weights": w, **res})
        rows.append(row)
        models.append((name, model))
        say(f"[{name}] done in {time.time() - t0:.0f} s")
    if s.attack == "none":
        columns = ["model", "method", "clean", "ms/img", "p90_ms", "img/s"]
    else:
        columns = ["model", "method", "clean"] + [f"PGD-{k}" for k in s.steps] + ["advAP", "acAP"]
    title = f"AP50 on {ds.name}" + ("" if s.attack == "none" else f", {s.attack} attack, eps {s.eps:g}, step eps/k")
    return BenchResult(title, columns, rows, details=details, extra={"details": details},
                       context={"sources": models, "backends": [], "dataset": ds, "device": dev,
                                "main": D.is_main()})


def network_latency(model, loader, device) -> Dict:
    """ms per image of the network alone (median and p90 after warm-up, on the first test batch), measured as the
    deployment harness measures every backend: not the data loading, not pycocotools."""
    from .backends import TorchBackend, measure_latency

    images = next(iter(loader))[0].numpy()
    lat = measure_latency(TorchBackend(model, device=device), model.postprocess, images)
    return {"ms/img": lat["ms_median"], "p90_ms": lat["ms_p90"], "img/s": lat["images_per_s"]}


def run_deployment(s: BenchSettings, log=print) -> BenchResult:
    """The harness: adversarial images from the source weights, every backend on the same images, the gate."""
    from fa_train import distributed as D
    from fa_train.checkpoint import check_classes, load_model
    from fa_train.engine import make_loader, resolve_device

    from .backends import BackendError
    from .onnx_export import sha256
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
    loaded = [load_backend(b, list(s.providers) or None, s.allow_cpu_fallback) for b in s.backends]
    for path, bk in zip(s.backends, loaded):
        check_backend_source(bk, path, model, weights, wsha, size, s.cross_model, log)
    ds = dataset_for(ckpt, "test", s.data, size, s.test_split, s.max_images, log=log)
    check_classes(ckpt, ds.class_names, weights, ds.name)
    loader = make_loader(ds, s.batch_size, False, s.workers)
    check_backend_outputs(model, loaded, s.backends, ds, dev)
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
                       context={"sources": [("source", model)],
                                "backends": [(r["backend"], b) for r, b in zip(res["rows"][1:], loaded)],
                                "dataset": ds, "device": dev, "main": True})


def check_backend_source(backend, path: str, model, weights: str, wsha: str, img_size: int, cross_model: bool,
                         log=print) -> None:
    """The backend was exported from `weights`, for this architecture and input size: its sidecar or manifest, else
    the metadata inside the ONNX file, says so. Another source is an error unless `cross_model`."""
    from .backends import BackendError
    from .loading import recorded_source

    rec = recorded_source(backend, path)
    arch = rec.get("model")
    if isinstance(arch, dict) and arch.get("name") and arch.get("name") != model.arch_config().get("name"):
        raise BackendError(f"{path}: exported from a {arch.get('name')} model, the source --weights {weights} is a "
                           f"{model.arch_config().get('name')}: the architectures differ")
    src = rec.get("source_sha256")
    if not src:
        msg = f"{path}: no record of the weights it was exported from (no sidecar, manifest or ONNX metadata)"
        if not cross_model:
            raise BackendError(msg + "; pass --cross-model to compare it with --weights anyway")
        log(f"fa-bench: warning: {msg}")
    elif src != wsha:
        msg = (f"{path}: exported from other weights ({rec.get('source_weights') or src[:12]}) than --weights "
               f"{weights}")
        if not cross_model:
            raise BackendError(msg + "; pass --cross-model to compare them anyway")
        log(f"fa-bench: warning: {msg} (--cross-model)")
    if isinstance(arch, dict) and arch.get("num_classes") not in (None, model.num_classes):
        raise BackendError(f"{path}: exported for {arch['num_classes']} classes, --weights {weights} has "
                           f"{model.num_classes}")
    size = rec.get("img_size")
    if size and int(size) != int(img_size):
        raise BackendError(f"{path}: exported for {size} px input, the benchmark uses {img_size} px")


def check_backend_outputs(model, backends, paths, dataset, device) -> None:
    """One test image through the source and each backend: the raw outputs must agree in number and shape (a file
    of another architecture, class count or a part of a split deployment is refused before the benchmark)."""
    import numpy as np

    from .backends import BackendError, TorchBackend

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
