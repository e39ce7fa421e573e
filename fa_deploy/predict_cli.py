"""`fa-predict`: a checkpoint or any exported file on your own images (a file, a folder or a glob): pictures with
boxes, `predictions.json` in COCO result format (original image pixels), optional YOLO text files, and with
`--attack pgd` the same images attacked from the source weights, side by side. The work is
`fa_deploy.runtime.predict.run_predict`."""
from __future__ import annotations

import click

from fa_train.errors import run_cli

from fa_deploy.runtime.predict import PredictSettings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("source")
@click.option("--weights", type=click.Path(dir_okay=False), help="fa-train checkpoint (.pt / .safetensors)")
@click.option("--backend", type=click.Path(dir_okay=False),
              help="exported model: .onnx, .engine or .pipeline.json (detections come from it; --weights then only "
                   "makes the --attack images)")
@click.option("--conf", type=float, default=0.25, help="score threshold of the boxes drawn and written")
@click.option("--out", "out_dir", default="runs/predict", type=click.Path(file_okay=False), help="output folder")
@click.option("--save-txt", is_flag=True, help="also write labels/<image>.txt: 'class cx cy w h score', normalised")
@click.option("--img-size", type=int, help="letterbox size (default: the checkpoint's or the exported file's)")
@click.option("--batch-size", type=int, help="images per network call (default: the file's optimal batch, or 8)")
@click.option("--device", default="auto", help="where a checkpoint and the attack run: auto | cpu | cuda[:N]")
@click.option("--attack", type=click.Choice(["pgd"]), help="also show each image under PGD from the --weights")
@click.option("--eps", type=float, default=0.03, help="attack budget in [0,1] pixel units")
@click.option("--steps", type=int, default=10, help="PGD steps (step size eps/steps)")
@click.option("--cross-model", is_flag=True,
              help="with --weights and --backend: use a file exported from other weights (an error otherwise)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def predict_main(**flags):
    """Detect objects in SOURCE (an image, a folder of images or a glob such as 'data/*.jpg') with a checkpoint
    (--weights) or an exported model (--backend)."""
    run_cli("fa-predict", _run, PredictSettings(**flags))


def _run(s: PredictSettings) -> int:
    from fa_deploy.runtime.predict import run_predict

    summary = run_predict(s, log=lambda m: click.echo(m, err=True))
    click.echo(f"{summary['images']} images, {summary['detections']} detections with score >= {s.conf:g} "
               f"({summary['network_images_per_s']:.1f} images/s through the network); "
               f"{summary['predictions']} and {len(summary['pictures'])} pictures in {s.out_dir}")
    return 0


if __name__ == "__main__":
    predict_main()
