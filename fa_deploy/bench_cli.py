"""`fa-bench`: the paper's robustness table (clean AP50, PGD-1/3/5/10 AP50, advAP, acAP) for one or more
checkpoints; with --backend, the deployment harness and its gate. The work is `fa_deploy.robustness.bench.run_bench`."""
from __future__ import annotations

import click

from fa_train.errors import EXIT_GATE, run_cli

from fa_deploy.settings import PAPER_STEPS, BenchSettings


def _steps(ctx, param, value: str):
    """Integers when they parse, else the text as given: BenchSettings.validate names the flag in one line."""
    try:
        return tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
        return value


def _numbers(value: str, kind):
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--weights", "weights", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="fa-train checkpoint (repeat for several rows)")
@click.option("--attack", default="pgd", metavar="NAME[,NAME...]",
              help="pgd: the paper's PGD-k rows on the whole detection loss; cls / loc: one TOD domain; apgd; "
                   "tog-vanishing, tog-fabrication, tog-mislabel, tog-untargeted; cwa (class-wise); suite: pgd + "
                   "apgd + the TOG attacks + cwa, with the worst case; a comma-separated list; none: clean AP and "
                   "speed only")
@click.option("--eps", type=float, default=0.03, help="attack budget in [0,1] pixel units")
@click.option("--steps", default=",".join(map(str, PAPER_STEPS)), callback=_steps,
              help="PGD step counts; step size eps/k")
@click.option("--apgd-iterations", type=int, default=20, help="APGD's (and cwa's) iterations per restart")
@click.option("--restarts", type=int, default=1, help="APGD's random starts, run as one batch; best loss per image")
@click.option("--tog-score", type=float, default=0.5,
              help="score from which a detection counts as confident: the clean detections TOG-mislabel and "
                   "TOG-untargeted aim at, and the TOG effect counts")
@click.option("--attack-seed", type=int, default=0,
              help="seed of the random starts (each image and each attack draws its own)")
@click.option("--attack-padding", is_flag=True,
              help="let the attacks change the letterbox padding too (by default it stays clean: an attacker "
                   "perturbs the image, not the padding the pipeline adds; the paper's code attacks the whole input)")
@click.option("--sanity", "sanity_dir", type=click.Path(file_okay=False),
              help="gradient-masking checks (Carlini et al. 2019) on each checkpoint: verdict table and AP50 curves "
                   "over eps and steps written to DIR; exit 1 when a check fails")
@click.option("--transfer-from", type=click.Path(dir_okay=False),
              help="with --sanity: a checkpoint whose APGD images must not beat the white-box attack")
@click.option("--sanity-eps", default="0.005,0.01,0.02,0.03,0.05,0.1", callback=lambda c, p, v: _numbers(v, float),
              help="with --sanity: the eps curve's points")
@click.option("--sanity-steps", default="1,2,5,10,20,50", callback=lambda c, p, v: _numbers(v, int),
              help="with --sanity: the steps curve's APGD iteration counts")
@click.option("--sanity-queries", type=int, default=100,
              help="with --sanity: loss evaluations per image of the gradient-free random search (forward passes, no "
                   "backward; 100 cost about what 40 APGD iterations do)")
@click.option("--data", help="voc:PATH | coco:PATH | yolo:PATH/data.yaml (--test-split: a yaml key, "
              "default val) | synth[:N] (default: the first checkpoint's training data)")
@click.option("--test-split", help="split to evaluate (default: the checkpoint's own test split when the data is "
              "its own, else voc 2007:test, coco val2017, yolo: the yaml's val key, synth shapes:test)")
@click.option("--img-size", type=int, help="default: the checkpoint's training size")
@click.option("--batch-size", type=int, default=16)
@click.option("--max-images", type=int, help="evaluate the first N test images only")
@click.option("--workers", type=int, default=1)
@click.option("--device", default="auto")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the table and details as JSON")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="write the table as Markdown")
@click.option("--backend", "backends", multiple=True, type=click.Path(dir_okay=False),
              help="exported model (.onnx, .engine or .pipeline.json) to evaluate on the same images as the source "
                   "--weights")
@click.option("--max-drop", type=float, default=0.02,
              help="with --backend: exit 1 when a backend's clean AP50 or advAP is lower than the source's by more")
@click.option("--max-deploy-misses", type=float, default=0.1, show_default=True,
              help="with --backend: exit 1 when a backend misses more than this fraction of the objects the source "
                   "detects on the same images (deployment-only misses), worst case over --threat")
@click.option("--min-clean-ap", type=float, default=0.05, show_default=True,
              help="with --backend or --sanity: below this clean AP50 of the source (or of a --sanity model) there is "
                   "nothing to attack, and the verdict is INCONCLUSIVE (exit 1), never PASS")
@click.option("--max-drift", type=float, default=None,
              help="with --backend: exit 1 when an output of a backend drifts from the source's on the same images by "
                   "more than this (mean |difference| / mean |source|, clean or adversarial images; default per "
                   "precision, from measured spreads: fp32 1e-4, fp16 1e-3, int8 0.1; Faster R-CNN, whose output is a "
                   "ranked detection list: fp32 1e-4, fp16 and int8 not gated unless this is given)")
@click.option("--threat", help="with --backend: transfer (images from the source weights), whitebox (from the "
              "backend's verified differentiable twin), differential (from the twin, keeping the source's detections), "
              "a comma-separated list, or all (default)")
@click.option("--diff-weight", type=float, default=1.0, show_default=True,
              help="differential threat: weight of the penalty on changing the source's detections")
@click.option("--detect-score", type=float, default=0.25, show_default=True,
              help="score from which a detection counts as detecting an object (deployment-only misses, and the "
                   "source detections the differential threat keeps)")
@click.option("--cross-model", is_flag=True,
              help="with --backend: compare files exported from other weights than --weights (an error otherwise)")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="keep the adversarial images on disk to reuse")
@click.option("--provider", "providers", multiple=True, type=click.Choice(["cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime execution provider for --backend ONNX files (repeatable, in priority order; default: "
                   "cuda with onnxruntime-gpu, else cpu); one that does not load is an error")
@click.option("--allow-cpu-fallback", is_flag=True,
              help="run on the CPU when a requested GPU provider does not load (the provider column says so)")
@click.option("--visualize", "vis_dir", type=click.Path(file_okay=False),
              help="write PNGs of the first --num-vis test images: each model (and backend) on the clean image and "
                   "under PGD-1 at --eps, boxes, ground truth and Grad-CAM of the aligned layer")
@click.option("--num-vis", type=int, default=4, help="images for --visualize / --report")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="write DIR/report.html (self-contained) and DIR/report.md: the tables, plots and pictures")
@click.option("--quiet", is_flag=True, help="no progress bars")
def main(**flags):
    """Robustness of trained detectors under PGD attacks (the paper's protocol); with --backend, of exported
    models on adversarial images made from the source weights' gradients, with a gate on the drop."""
    from fa_train import distributed as D

    run_cli("fa-bench", _run, BenchSettings(**flags), on_exit=D.shutdown)


def _run(s: BenchSettings) -> int:
    from fa_deploy.robustness.bench import run_bench, write_outputs
    from fa_deploy.report.tables import console_table

    def log(m):
        click.echo(m, err=True)

    result = run_bench(s, log)
    if not result.context.get("main", True):  # another rank of a torchrun: rank 0 reports
        return 0
    click.echo(console_table(result.rows, result.columns, result.title))
    for caption, rows, columns in result.tables:
        click.echo("\n" + console_table(rows, columns, caption))
    if result.failures is not None:
        click.echo(f"{result.gate_name}: {result.verdict_text()}")
    write_outputs(result, s, log)
    return EXIT_GATE if result.gate_failed else 0


if __name__ == "__main__":
    main()
