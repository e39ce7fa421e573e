"""`fa-export`: a checkpoint to ONNX (fp32 / fp16 / int8) and TensorRT engines, with a parity check. The work is
`fa_deploy.exporting.run.run_export`."""
from __future__ import annotations

import click

from fa_train.errors import EXIT_GATE, run_cli

from fa_deploy.settings import ExportSettings


def _batch_range(ctx, param, value):
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.split(":")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected MIN:OPT:MAX, e.g. 1:8:32") from None
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise click.BadParameter(f"{value!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(parts)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="ONNX precision to write (repeatable)")
@click.option("--engine", "engine", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="also build a TensorRT engine from the ONNX file of this precision (needs the gpu extra)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="output folder (default: WEIGHTS' folder/export)")
@click.option("--img-size", type=int, help="input size (default: the checkpoint's training size)")
@click.option("--batch", type=int, help="a static batch of N images (default: a dynamic batch, see --dynamic-batch)")
@click.option("--dynamic-batch", "dynamic", callback=_batch_range,
              help="dynamic batch MIN:OPT:MAX (ONNX batch axis and TensorRT profile) [default: 1:8:32]")
@click.option("--opset", type=int, default=17)
@click.option("--calib-data", help="int8 calibration and parity-check data: voc:PATH | coco:PATH | yolo:PATH/data.yaml | synth[:N] "
              "(default: the training data the checkpoint records; calibration on its train split, parity on its "
              "test split)")
@click.option("--calib-images", type=int, default=64, help="int8 calibration images")
@click.option("--calib-pgd", is_flag=True, help="calibrate on clean plus PGD-1 images made with the source weights")
@click.option("--calib-eps", type=float, default=0.03, help="eps of the --calib-pgd images")
@click.option("--workspace", type=int, default=4096, help="TensorRT workspace pool limit, MB")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated)")
@click.option("--verify-images", type=int, default=8, help="images of the parity check")
@click.option("--no-verify", is_flag=True, help="do not fail on a parity check outside the tolerances")
def export_main(**flags):
    """Export fa-train WEIGHTS to ONNX (fp32 / fp16 / int8) and TensorRT engines, with a parity check."""
    run_cli("fa-export", _run, ExportSettings(**flags))


def _run(s: ExportSettings) -> int:
    from fa_deploy.exporting.run import run_export

    result = run_export(s, log=lambda m: click.echo(m, err=True), show=click.echo)
    if result.failed and not s.no_verify:
        click.echo(f"fa-export: parity outside the tolerances for {', '.join(result.failed)} (see the table; "
                   f"--no-verify to keep going)", err=True)
        return EXIT_GATE
    return 0


if __name__ == "__main__":
    export_main()
