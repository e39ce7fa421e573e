"""`fa-bench`: the paper's robustness table (clean AP50, PGD-1/3/5/10 AP50, advAP, acAP) for one or more
weights, as a console table, Markdown and JSON."""
from __future__ import annotations

import os
import sys
import time

import click


def _checkpoint_data(ckpt: dict, data=None, img_size=None):
    """(data spec, image size, synth seed): the flags when given, else what the checkpoint was trained on."""
    dcfg = ckpt.get("config", {}).get("data", {})
    return data or dcfg.get("spec", "synth"), img_size or dcfg.get("img_size", 416), dcfg.get("synth_seed", 0)


def _dataset_for(ckpt: dict, role: str, data=None, img_size=None, split=None, max_images=None):
    from fa_train.data import build_dataset

    spec, size, seed = _checkpoint_data(ckpt, data, img_size)
    return build_dataset(spec, role, size, split, max_images, seed, log=lambda m: click.echo(m, err=True))


def _steps(value: str):
    try:
        steps = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers like 1,3,5,10") from None
    if not steps or min(steps) < 1:
        raise click.BadParameter(f"{value!r}: steps must be >= 1")
    return steps


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--weights", "weights", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="fa-train checkpoint (repeat for several rows)")
@click.option("--attack", type=click.Choice(["pgd", "cls", "loc", "none"]), default="pgd",
              help="pgd: the whole detection loss; cls / loc: one TOD domain; none: clean AP and speed only")
@click.option("--eps", type=float, default=0.03, help="attack budget in [0,1] pixel units")
@click.option("--steps", default="1,3,5,10", help="PGD step counts; step size eps/k")
@click.option("--data", help="voc:PATH | coco:PATH | synth[:N] (default: the first checkpoint's training data)")
@click.option("--test-split", help="split to evaluate (default by dataset)")
@click.option("--img-size", type=int, help="default: the checkpoint's training size")
@click.option("--batch-size", type=int, default=16)
@click.option("--max-images", type=int, help="evaluate the first N test images only")
@click.option("--workers", type=int, default=1)
@click.option("--device", default="auto")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the table and details as JSON")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="write the table as Markdown")
@click.option("--backend", "backends", multiple=True, type=click.Path(dir_okay=False),
              help="exported model (.onnx or .engine) to evaluate on the same images as the source --weights")
@click.option("--max-drop", type=float, default=0.02,
              help="with --backend: exit 1 when a backend's clean AP50 or advAP is lower than the source's by more")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="keep the adversarial images on disk to reuse")
@click.option("--visualize", "vis_dir", type=click.Path(file_okay=False),
              help="write PNGs of the first --num-vis test images: each model (and backend) on the clean image and "
                   "under PGD-1 at --eps, boxes, ground truth and Grad-CAM of the aligned layer")
@click.option("--num-vis", type=int, default=4, help="images for --visualize / --report")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="write DIR/report.html (self-contained) and DIR/report.md: the tables, plots and pictures")
@click.option("--quiet", is_flag=True, help="no progress bars")
def main(weights, attack, eps, steps, data, test_split, img_size, batch_size, max_images, workers, device,
         json_path, md_path, backends, max_drop, cache_dir, vis_dir, num_vis, report_dir, quiet):
    """Robustness of trained detectors under PGD attacks (the paper's protocol); with --backend, of exported
    models on adversarial images made from the source weights' gradients, with a gate on the drop."""
    from fa_train import distributed as D

    if backends and D.env_world_size() > 1:
        raise click.UsageError("--backend runs in one process (the exported models are not sharded); "
                               "run it without torchrun")
    if backends:
        if len(weights) != 1:
            raise click.UsageError("--backend compares exported models with ONE source --weights")
        return _harness_main(weights[0], backends, attack, eps, _steps(steps), data, test_split, img_size,
                             batch_size, max_images, workers, device, json_path, md_path, max_drop, cache_dir, quiet,
                             vis_dir, num_vis, report_dir)
    from fa_train.checkpoint import CheckpointError, check_classes, load_model
    from fa_train.data import DataError
    from fa_train.engine import eval_loader, resolve_device
    from fa_train.evaluation import evaluate, robustness

    from .report import console_table, markdown_table, write_json

    steps_t = _steps(steps)
    try:
        # under torchrun every rank evaluates its shard of the test set; rank 0 gathers, scores and writes
        dev = resolve_device(D.init_from_env(device) or device)
        main_rank = D.is_main()
        if not main_rank:
            quiet = True
        say = (lambda m: click.echo(m, err=True)) if D.is_main() else (lambda m: None)
        rows, details, ds = [], [], None
        for w in weights:
            model, ckpt = load_model(w)
            model.to(dev).eval()
            cfg = ckpt.get("config", {})
            if ds is None:
                ds = _dataset_for(ckpt, "test", data, img_size, test_split, max_images)
                loader = eval_loader(ds, batch_size, workers)
            check_classes(ckpt, ds.class_names, w, ds.name)
            name = os.path.basename(os.path.dirname(os.path.abspath(w))) or w
            method = cfg.get("method", {}).get("name", "?")
            say(f"[{name}] {attack} on {ds.name} ({len(ds)} images"
                + (f", {D.world_size()} processes)" if D.world_size() > 1 else ")"))
            t0 = time.time()
            if attack == "none":
                res = evaluate(model, loader, dev, progress=not quiet)
                row = {"model": name, "method": method, "clean": res["AP50"],
                       "ms/img": 1000 * res["seconds"] / max(res["images"], 1)}
                details.append({"weights": w, "clean": res})
            else:
                res = robustness(model, loader, dev, eps=eps, steps=steps_t, attack=attack, progress=not quiet)
                row = {"model": name, "method": method, **res["row"]}
                details.append({"weights": w, **res})
            rows.append(row)
            say(f"[{name}] done in {time.time() - t0:.0f} s")
    except (DataError, CheckpointError, ValueError, RuntimeError) as e:
        click.echo(f"fa-bench: error: {e}", err=True)
        D.shutdown()
        sys.exit(2)
    D.shutdown()
    if not main_rank:
        return
    if attack == "none":
        columns = ["model", "method", "clean", "ms/img"]
    else:
        columns = ["model", "method", "clean"] + [f"PGD-{k}" for k in steps_t] + ["advAP", "acAP"]
    title = (f"AP50 on {ds.name}" + ("" if attack == "none" else f", {attack} attack, eps {eps:g}, step eps/k"))
    click.echo(console_table(rows, columns, title))
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"{title}\n\n{markdown_table(rows, columns)}\n")
    if json_path:
        write_json({"title": title, "columns": columns, "rows": rows, "details": details}, json_path)
    if vis_dir or report_dir:
        from fa_train.checkpoint import load_model

        if report_dir:
            os.makedirs(report_dir, exist_ok=True)
        sources = []
        for w, r in zip(weights, rows):
            m, _ = load_model(w)
            sources.append((r["model"], m.to(dev).eval()))
        figs = _pictures(sources, [], ds, dev, vis_dir, num_vis, eps, attack, report_dir)
        if report_dir:
            plots = []
            if attack != "none":
                from .plots import steps_plot, tradeoff_plot

                plots = [("clean AP50 against advAP, dotted lines of equal acAP",
                          tradeoff_plot(rows, os.path.join(report_dir, "tradeoff.png"))),
                         ("AP50 against PGD steps", steps_plot(rows, steps_t, os.path.join(report_dir, "steps.png")))]
            _write_report(report_dir, "fa-bench: robustness report", [(title, rows, columns)], plots + figs)


def _pictures(sources, backends, ds, dev, vis_dir, num_vis, eps, attack, report_dir):
    """--visualize / --report: the detection PNGs, as (caption, path) figures."""
    from fa_train.evaluation import attack_loss_keys

    from .visualize import visualize

    out = vis_dir or os.path.join(report_dir, "detections")
    keys = None if attack in ("pgd", "none") else attack_loss_keys(sources[0][1], attack)
    paths = visualize(sources, ds, out, dev, num_images=num_vis, eps=eps, backends=backends, attack_keys=keys,
                      log=lambda m: click.echo(m, err=True))
    return [(f"{os.path.basename(p)}: clean and PGD-1 (eps {eps:g}); green boxes predicted, white dashed ground "
             f"truth; heat map: Grad-CAM of the aligned layer through the detection loss", p) for p in paths]


def _write_report(report_dir, title, tables, figures, verdict=""):
    from .html_report import write_report

    paths = write_report(report_dir, title, tables, figures, verdict=verdict)
    click.echo(f"report: {paths['html']} and {paths['markdown']}", err=True)


def _harness_main(weights, backends, attack, eps, steps, data, test_split, img_size, batch_size, max_images, workers,
                  device, json_path, md_path, max_drop, cache_dir, quiet, vis_dir=None, num_vis=4, report_dir=None):
    from fa_train.checkpoint import CheckpointError, check_classes, load_model
    from fa_train.data import DataError
    from fa_train.engine import make_loader, resolve_device

    from .backends import BackendError, load_backend
    from .export import ExportError, sha256
    from .harness import gate, run_harness
    from .report import console_table, markdown_table, write_json
    from .tensorrt import EngineMismatch, TensorRTUnavailable

    try:
        dev = resolve_device(device)
        model, ckpt = load_model(weights)
        model.to(dev).eval()
        _, size, _ = _checkpoint_data(ckpt, data, img_size)
        wsha = sha256(weights)
        loaded = []
        for b in backends:
            bk = load_backend(b)
            side = getattr(bk, "sidecar", None) or {}
            if side.get("source_sha256") and side["source_sha256"] != wsha:
                click.echo(f"fa-bench: warning: {b} was exported from other weights ({side.get('source_weights')})",
                           err=True)
            shape = side.get("input", {}).get("shape")
            if shape and shape[-1] != size:
                raise BackendError(f"{b}: exported for {shape[-1]} px input, the benchmark uses {size} px")
            loaded.append(bk)
        ds = _dataset_for(ckpt, "test", data, size, test_split, max_images)
        check_classes(ckpt, ds.class_names, weights, ds.name)
        loader = make_loader(ds, batch_size, False, workers)
        res = run_harness(model, loaded, loader, dev, eps, steps, attack, cache_dir, wsha, progress=not quiet,
                          source_path=weights)
    except (DataError, CheckpointError, BackendError, ExportError, EngineMismatch, TensorRTUnavailable,
            ValueError) as e:
        click.echo(f"fa-bench: error: {e}", err=True)
        sys.exit(2)
    ap_cols = ["clean"] + ([] if attack == "none" else [f"PGD-{k}" for k in steps] + ["advAP", "acAP"])
    drops = ["drop_clean"] + ([] if attack == "none" else ["drop_advAP"])
    columns = ["backend", "format", "precision", "size_MB", *ap_cols, *drops, "drift_clean",
               *([] if attack == "none" else ["drift_adv"]), "ms/img", "p90_ms", "img/s", "pre_ms", "post_ms"]
    title = (f"AP50 on {ds.name}" + ("" if attack == "none" else
                                      f", {attack} attack from the source weights, eps {eps:g}, step eps/k"))
    click.echo(console_table(res["rows"], columns, title))
    failures = gate(res["rows"], max_drop)
    verdict = "PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)
    click.echo(f"gate (max drop {max_drop}): {verdict}")
    if md_path:
        with open(md_path, "w") as f:
            f.write(f"{title}\n\n{markdown_table(res['rows'], columns)}\n\ngate (max drop {max_drop}): "
                    f"{'PASS' if not failures else 'FAIL'}\n")
    if json_path:
        write_json({"title": title, "columns": columns, **res, "gate": {"max_drop": max_drop, "failures": failures}},
                   json_path)
    if vis_dir or report_dir:
        if report_dir:
            os.makedirs(report_dir, exist_ok=True)
        figs = _pictures([("source", model)], [(b.name, b) for b in loaded], ds, dev, vis_dir, num_vis, eps, attack,
                         report_dir)
        if report_dir:
            from .plots import drop_plot, steps_plot, tradeoff_plot

            plots = [("drop of each backend against the source",
                      drop_plot(res["rows"], os.path.join(report_dir, "deploy_drop.png"), max_drop))]
            if attack != "none":
                plots += [("clean AP50 against advAP per backend, dotted lines of equal acAP",
                           tradeoff_plot(res["rows"], os.path.join(report_dir, "tradeoff.png"), "backend")),
                          ("AP50 against PGD steps per backend",
                           steps_plot(res["rows"], steps, os.path.join(report_dir, "steps.png"), "backend"))]
            _write_report(report_dir, "fa-bench: deployment report", [(title, res["rows"], columns)], plots + figs,
                          verdict=f"{'PASS' if not failures else 'FAIL'} (max drop {max_drop})")
    if failures:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------- fa-export

def _batch_range(value: str):
    try:
        parts = [int(v) for v in value.split(":")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected MIN:OPT:MAX, e.g. 1:8:32") from None
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise click.BadParameter(f"{value!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(parts)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="ONNX precision to write (repeatable)")
@click.option("--engine", "engine_precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="also build a TensorRT engine from the ONNX file of this precision (needs the gpu extra)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="output folder (default: WEIGHTS' folder/export)")
@click.option("--img-size", type=int, help="input size (default: the checkpoint's training size)")
@click.option("--batch", type=int, default=1, help="batch size of a static-batch export")
@click.option("--dynamic-batch", "dynamic", help="dynamic batch MIN:OPT:MAX (ONNX batch axis and TensorRT profile)")
@click.option("--opset", type=int, default=17)
@click.option("--calib-data", help="int8 calibration data: voc:PATH | coco:PATH | synth[:N] (default: the training data)")
@click.option("--calib-images", type=int, default=64, help="int8 calibration images")
@click.option("--calib-pgd", is_flag=True, help="calibrate on clean plus PGD-1 images made with the source weights")
@click.option("--calib-eps", type=float, default=0.03, help="eps of the --calib-pgd images")
@click.option("--workspace", type=int, default=4096, help="TensorRT workspace pool limit, MB")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated)")
@click.option("--verify-images", type=int, default=8, help="images of the parity check")
@click.option("--no-verify", is_flag=True, help="do not fail on a parity check outside the tolerances")
def export_main(weights, onnx_precisions, engine_precisions, out_dir, img_size, batch, dynamic, opset, calib_data,
                calib_images, calib_pgd, calib_eps, workspace, timing_cache, verify_images, no_verify):
    """Export fa-train WEIGHTS to ONNX (fp32 / fp16 / int8) and TensorRT engines, with a parity check."""
    import numpy as np

    from fa_train.checkpoint import CheckpointError, load_model
    from fa_train.data import DataError
    from fa_train.engine import make_loader

    from . import export as ex
    from .backends import OrtBackend, TorchBackend
    from .report import console_table

    if not onnx_precisions and not engine_precisions:
        raise click.UsageError("nothing to do: give --onnx and/or --engine")
    brange = _batch_range(dynamic) if dynamic else (batch, batch, batch)
    try:
        model, ckpt = load_model(weights)
    except CheckpointError as e:
        click.echo(f"fa-export: error: {e}", err=True)
        sys.exit(2)
    model.eval()
    calib_spec, img_size, _ = _checkpoint_data(ckpt, calib_data, img_size)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(weights)), "export")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(weights))[0]
    precisions = sorted(set(onnx_precisions) | set(engine_precisions), key=["fp32", "fp16", "int8"].index)
    if getattr(model, "export_parts", None):  # deployed as several networks with the model's glue
        return _export_split_main(model, ckpt, weights, out_dir, stem, precisions, engine_precisions, img_size, opset,
                                  calib_data, calib_spec, calib_images, calib_pgd, calib_eps, verify_images, brange,
                                  dynamic, workspace, timing_cache, no_verify)
    keep = getattr(model, "export_keep_float32", ())
    paths = {}
    try:
        fp32 = os.path.join(out_dir, f"{stem}.fp32.onnx")
        ex.export_fp32(model, fp32, img_size, batch=brange[1], dynamic_batch=dynamic is not None, opset=opset)
        paths["fp32"] = fp32
        test_ds = _dataset_for(ckpt, "test", calib_data, img_size, max_images=max(verify_images, 1))
        verify = np.concatenate([test_ds[i][0][None].numpy() for i in range(min(verify_images, len(test_ds)))])
        if "fp16" in precisions:
            paths["fp16"] = os.path.join(out_dir, f"{stem}.fp16.onnx")
            kept = ex.export_fp16(fp32, paths["fp16"], keep)
            click.echo(f"fp16: {len(kept)} decode nodes kept in float32", err=True)
        if "int8" in precisions:
            cal_ds = _dataset_for(ckpt, "train", calib_data, img_size, max_images=calib_images)
            cal = ex.calibration_batches(model, make_loader(cal_ds, 8, False, 0), calib_images, calib_pgd, calib_eps)
            paths["int8"] = os.path.join(out_dir, f"{stem}.int8.onnx")
            ex.export_int8(fp32, paths["int8"], cal, keep)
            click.echo(f"int8: calibrated on {sum(len(c) for c in cal)} images"
                       f"{' (clean + PGD)' if calib_pgd else ''}", err=True)
        for prec in precisions:
            info = ex.sidecar_info(weights, ckpt, model, img_size, prec, opset, list(brange) if dynamic else batch)
            if prec == "int8":
                info["calibration"] = {"images": calib_images, "pgd": calib_pgd,
                                       "eps": calib_eps if calib_pgd else None,
                                       "data": calib_spec}
            ex.write_sidecar(paths[prec], info)
    except (DataError, ex.ExportError, NotImplementedError) as e:
        click.echo(f"fa-export: error: {e}", err=True)
        sys.exit(2)
    # parity against the source weights, in batches the exported shape accepts
    chunk = brange[2] if dynamic else batch

    def run(backend):
        parts = [backend.raw(verify[i:i + chunk]) for i in range(0, len(verify), chunk)]
        if dynamic is None and len(verify) % chunk:  # a static batch cannot take the remainder
            parts = parts[:-1]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    if dynamic is None and len(verify) < chunk:  # a static batch needs at least one full batch
        verify = np.concatenate([verify] * (chunk // len(verify) + 1))[:chunk]
    ref = run(TorchBackend(model))
    rows, failed = [], []
    for prec in precisions:
        rep = ex.parity(ref, run(OrtBackend(paths[prec], ["CPUExecutionProvider"])), prec)
        for name, o in rep["outputs"].items():
            rows.append({"file": os.path.basename(paths[prec]), "output": name, "max_abs": o.get("max_abs"),
                         "mean_abs": o.get("mean_abs"), "max_rel": o.get("max_rel"),
                         "fail_frac": o.get("fail_fraction", "-"),
                         "result": "pass" if o.get("passed", True) else "FAIL",
                         "size_MB": os.path.getsize(paths[prec]) / 2**20})
        ex.write_sidecar(paths[prec], {**ex.read_sidecar(paths[prec]), "parity": rep})
        if not rep["passed"]:
            failed.append(prec)
    click.echo(console_table(rows, ["file", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result",
                                    "size_MB"], f"parity against {weights} on {len(ref[0])} images (ONNX Runtime CPU)"))
    for prec in precisions:
        click.echo(f"wrote {paths[prec]} (+ .json sidecar)")
    if engine_precisions:
        _require_tensorrt(weights, engine_precisions, dynamic, img_size)
        from .backends import TrtBackend
        from .tensorrt import build_engine

        for prec in engine_precisions:
            eng = os.path.join(out_dir, f"{stem}.{prec}.engine")
            meta = build_engine(paths[prec], eng, ex.INPUT_NAME, img_size, brange, workspace, timing_cache,
                                log=lambda m: click.echo(m, err=True))
            ex.write_sidecar(eng, {**ex.read_sidecar(paths[prec]), **meta, "precision": prec})
            rep = ex.parity(ref, run(TrtBackend(eng)), prec)
            ex.write_sidecar(eng, {**ex.read_sidecar(eng), "parity": rep})
            click.echo(f"wrote {eng}: parity {'pass' if rep['passed'] else 'FAIL'}")
            if not rep["passed"]:
                failed.append(f"{prec} engine")
    if failed and not no_verify:
        click.echo(f"fa-export: parity outside the tolerances for {', '.join(failed)} (see the table; "
                   f"--no-verify to keep going)", err=True)
        sys.exit(1)


def _require_tensorrt(weights, engine_precisions, dynamic, img_size):
    """--engine without TensorRT or a GPU: the ONNX files are written; exit 2 with the command for the GPU."""
    from .tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        click.echo(f"fa-export: TensorRT engines not built: {why}.\nThe ONNX files are written; build the "
                   f"engines on the deployment GPU with:\n  pip install -e '.[gpu]'\n  fa-export {weights} "
                   + " ".join(f"--engine {p}" for p in engine_precisions)
                   + (f" --dynamic-batch {dynamic}" if dynamic else "") + f" --img-size {img_size}", err=True)
        sys.exit(2)


def _export_split_main(model, ckpt, weights, out_dir, stem, precisions, engine_precisions, img_size, opset,
                       calib_data, calib_spec, calib_images, calib_pgd, calib_eps, verify_images, brange, dynamic,
                       workspace, timing_cache, no_verify):
    """fa-export for a detector deployed as two networks (Faster R-CNN; fa_deploy/split.py): the ONNX parts and a
    pipeline manifest per precision, parity of each part against the source, TensorRT engines of each part."""
    import numpy as np

    from fa_train.data import DataError
    from fa_train.engine import make_loader

    from . import export as ex
    from . import split
    from .backends import OrtBackend
    from .report import console_table

    def calibration():
        cal_ds = _dataset_for(ckpt, "train", calib_data, img_size, max_images=calib_images)
        return ex.calibration_batches(model, make_loader(cal_ds, 4, False, 0), calib_images, calib_pgd, calib_eps)

    calib_info = {"images": calib_images, "pgd": calib_pgd, "eps": calib_eps if calib_pgd else None,
                  "data": calib_spec, "parts": ["backbone"]}
    try:
        manifests = split.export_split(model, weights, ckpt, out_dir, stem, precisions, img_size, opset, calibration,
                                       calib_info, log=lambda m: click.echo(m, err=True))
        test_ds = _dataset_for(ckpt, "test", calib_data, img_size, max_images=max(verify_images, 1))
        verify = np.concatenate([test_ds[i][0][None].numpy() for i in range(min(verify_images, len(test_ds)))])
    except (DataError, ex.ExportError) as e:
        click.echo(f"fa-export: error: {e}", err=True)
        sys.exit(2)
    rows, failed = [], []

    def record(label, reports, sizes):
        ok = True
        for part, rep in reports.items():
            for name, o in rep["outputs"].items():
                rows.append({"file": label, "part": part, "output": name, "max_abs": o.get("max_abs"),
                             "mean_abs": o.get("mean_abs"), "max_rel": o.get("max_rel"),
                             "fail_frac": o.get("fail_fraction", "-"),
                             "result": "pass" if o.get("passed", True) else "FAIL", "size_MB": sizes[part]})
            ok &= rep["passed"]
        return ok

    for prec in precisions:
        info = split.read_manifest(manifests[prec])
        base = os.path.dirname(manifests[prec])
        part_files = {k: os.path.join(base, v) for k, v in info["parts"].items()}
        reports = split.part_parity(model, manifests[prec], verify,
                                    lambda part: OrtBackend(part_files[part], ["CPUExecutionProvider"]).raw)
        split.write_manifest(manifests[prec], {**info, "parity": reports})
        if not record(os.path.basename(manifests[prec]), reports,
                      {k: os.path.getsize(v) / 2**20 for k, v in part_files.items()}):
            failed.append(prec)
    click.echo(console_table(rows, ["file", "part", "output", "max_abs", "mean_abs", "max_rel", "fail_frac", "result",
                                    "size_MB"],
                             f"parity of each part against {weights} on {len(verify)} images (ONNX Runtime CPU)"))
    for prec in precisions:
        click.echo(f"wrote {manifests[prec]} (parts: {', '.join(split.read_manifest(manifests[prec])['parts'].values())})")
    if engine_precisions:
        _require_tensorrt(weights, engine_precisions, dynamic, img_size)
        from .backends import TrtBackend
        from .tensorrt import build_engine

        h, w = model.transformed_size(img_size)
        channels = model.detector.backbone.out_channels
        pool = model.detector.roi_heads.box_roi_pool.output_size
        pool = (pool, pool) if isinstance(pool, int) else tuple(pool)
        per_image = int(model.detector.rpn._post_nms_top_n["testing"])
        shapes = {"backbone": tuple((b, 3, h, w) for b in brange),
                  "roi_heads": ((1, channels, *pool), (per_image * brange[1], channels, *pool),
                                (per_image * brange[2], channels, *pool))}
        for prec in engine_precisions:
            info = split.read_manifest(manifests[prec])
            base = os.path.dirname(manifests[prec])
            engines, metas = {}, {}
            for part, onnx_name in info["parts"].items():
                eng = os.path.join(out_dir, f"{stem}.{prec}.{part}.engine")
                metas[part] = build_engine(os.path.join(base, onnx_name), eng, info["part_io"][part]["input"], img_size,
                                           brange, workspace, timing_cache, log=lambda m: click.echo(m, err=True),
                                           profile_shapes=shapes[part])
                ex.write_sidecar(eng, {**metas[part], "precision": info["part_precisions"][part]})
                engines[part] = os.path.basename(eng)
            manifest = os.path.join(out_dir, f"{stem}.{prec}.engine.pipeline.json")
            split.write_manifest(manifest, {**info, **metas["backbone"], "format": "tensorrt-pipeline",
                                             "parts": engines})
            reports = split.part_parity(model, manifest, verify,
                                        lambda part: TrtBackend(os.path.join(out_dir, engines[part])).raw)
            split.write_manifest(manifest, {**split.read_manifest(manifest), "parity": reports})
            passed = all(r["passed"] for r in reports.values())
            click.echo(f"wrote {manifest}: parity {'pass' if passed else 'FAIL'}")
            if not passed:
                failed.append(f"{prec} engines")
    if failed and not no_verify:
        click.echo(f"fa-export: parity outside the tolerances for {', '.join(failed)} (see the table; "
                   f"--no-verify to keep going)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
