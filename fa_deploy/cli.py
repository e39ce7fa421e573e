"""`fa-bench`: the paper's robustness table (clean AP50, PGD-1/3/5/10 AP50, advAP, acAP) for one or more
weights, as a console table, Markdown and JSON."""
from __future__ import annotations

import os
import sys
import time

import click

COLUMNS_PGD = ["model", "method", "clean", "PGD-{k}", "advAP", "acAP"]


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
@click.option("--quiet", is_flag=True, help="no progress bars")
def main(weights, attack, eps, steps, data, test_split, img_size, batch_size, max_images, workers, device,
         json_path, md_path, quiet):
    """Robustness of trained detectors under PGD attacks (the paper's protocol)."""
    from fa_train.checkpoint import CheckpointError, load_model
    from fa_train.data import DataError, build_dataset
    from fa_train.engine import make_loader, resolve_device
    from fa_train.evaluation import evaluate, robustness

    from .report import console_table, markdown_table, write_json

    steps_t = _steps(steps)
    try:
        dev = resolve_device(device)
        rows, details, ds = [], [], None
        for w in weights:
            model, ckpt = load_model(w)
            model.to(dev).eval()
            cfg = ckpt.get("config", {})
            dcfg = cfg.get("data", {})
            if ds is None:
                ds = build_dataset(data or dcfg.get("spec", "synth"), "test", img_size or dcfg.get("img_size", 416),
                                   test_split, max_images, dcfg.get("synth_seed", 0),
                                   log=lambda m: click.echo(m, err=True))
                loader = make_loader(ds, batch_size, False, workers)
            if list(ckpt.get("class_names", [])) != list(ds.class_names):
                raise CheckpointError(f"{w}: trained for classes {ckpt.get('class_names')}, but {ds.name} has "
                                      f"{ds.class_names}")
            name = os.path.basename(os.path.dirname(os.path.abspath(w))) or w
            method = cfg.get("method", {}).get("name", "?")
            click.echo(f"[{name}] {attack} on {ds.name} ({len(ds)} images)", err=True)
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
            click.echo(f"[{name}] done in {time.time() - t0:.0f} s", err=True)
    except (DataError, CheckpointError, ValueError) as e:
        click.echo(f"fa-bench: error: {e}", err=True)
        sys.exit(2)
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


if __name__ == "__main__":
    main()
