"""`fa-train`: train a detector (standard training; adversarial methods with --method)."""
from __future__ import annotations

import os

import click

from .config import check_config, check_output_folder, load_config, overrides_from_flags, resume_config
from .errors import run_cli


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML preset (configs/*.yaml)")
@click.option("--model", type=click.Choice(["yolov3", "fasterrcnn_resnet50_fpn"]), help="the detector")
@click.option("--backbone", help="Faster R-CNN: resnet50 (the paper) | resnet18 | resnet34 | resnet101")
@click.option("--weights-backbone", help="Faster R-CNN: local torchvision ImageNet ResNet checkpoint (.pth)")
@click.option("--width-mult", type=float, help="YOLOv3 channel multiplier (1.0 = Darknet-53 as in the cfg)")
@click.option("--depth-mult", type=float, help="YOLOv3 residual-block multiplier")
@click.option("--data", help="voc:PATH_TO_VOCdevkit | coco:PATH_TO_COCO | yolo:PATH/data.yaml (Ultralytics "
              "layout; splits are the yaml's keys: train, val, test) | synth[:NUM_IMAGES] (default: synth)")
@click.option("--train-split", help="VOC '2007+2012:trainval', COCO 'train2017' (default by dataset)")
@click.option("--test-split", help="VOC '2007:test', COCO 'val2017' (default by dataset)")
@click.option("--max-images", type=int, help="use only the first N training images")
@click.option("--max-test-images", type=int, help="use only the first N test images")
@click.option("--img-size", type=int, help="letterbox size, a multiple of 32")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="initial learning rate")
@click.option("--warmup-iters", type=int, help="burn-in iterations")
@click.option("--schedule", type=click.Choice(["step", "cosine"]), help="step: x0.1 at 2/3 of the run")
@click.option("--eval-every", type=int, help="evaluate every N epochs (0: only at the end)")
@click.option("--amp/--no-amp", default=None, help="mixed precision (CUDA only)")
@click.option("--workers", type=int, help="data-loader worker processes")
@click.option("--seed", type=int)
@click.option("--device", help="auto | cpu | cuda | cuda:N")
@click.option("--out", help="run folder (config.yaml, last.pt, best.pt, metrics.jsonl, eval.json); "
              "default runs/exp, or with --resume the checkpoint's folder")
@click.option("--init", help="initial weights: Darknet .weights / darknet53.conv.74, or a fa-train checkpoint")
@click.option("--resume", type=click.Path(dir_okay=False),
              help="continue a run from its last.pt, with the configuration stored in it; only the flags given "
                   "(and a --config preset) change it, and only where the run stays the same (--epochs, --device, ...)")
@click.option("--method", type=click.Choice(["standard", "at", "tod", "kdfa", "ssfa", "fa"]),
              help="standard | at (vanilla adversarial) | tod (task-oriented domain) | kdfa | ssfa | fa (kdfa+ssfa)")
@click.option("--pgd-steps", type=int, help="PGD steps k of adversarial training (1, 2, 3); cost k+1 passes")
@click.option("--train-eps", type=float, help="attack budget in [0,1] pixel units (default 0.01)")
@click.option("--step-size", type=float, help="PGD step size (default 0.01)")
@click.option("--alpha", type=float, help="weight of the clean loss; (1-alpha) weighs the adversarial loss (default 0.5)")
@click.option("--ssfa-weight", type=float, help="beta of equation (3): SSFA, aligned to the student's own clean features")
@click.option("--kdfa-weight", type=float, help="gamma of equation (3): KDFA, aligned to the teacher's clean features")
@click.option("--teacher", help="KDFA teacher checkpoint (default: the initial weights, as in the paper)")
@click.option("--save-every-steps", type=int, help="also write last.pt every N optimizer steps (0: per epoch only)")
@click.option("--save-safetensors", is_flag=True, default=None,
              help="also write last/best weights as .safetensors (no pickle; arch and classes in the metadata)")
@click.option("--sync-bn", is_flag=True, default=None,
              help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
@click.option("--bad-images", type=click.Choice(["stop", "skip"]),
              help="a corrupt or inconsistent training image: stop with its name (default) or skip it (counted)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def main(config_path, resume, quiet, **flags):
    """Train an object detector. With no --data, the embedded synthetic shapes dataset is generated
    (once, into ~/.cache/fa-toolkit) and used.

    Several processes: `torchrun --nproc_per_node N -m fa_train.cli ...` (or the fa-train script under torchrun):
    --batch-size is then the global batch, split over the N ranks."""
    from .distributed import shutdown

    run_cli("fa-train", train_from_flags, config_path, resume, quiet, flags, on_exit=shutdown)


def train_from_flags(config_path, resume, quiet, flags, log=None) -> dict:
    """The run the flags describe (a new run, or the resume of one); the last epoch's clean evaluation, or None
    when a resumed run was already finished."""
    from .checkpoint import load_checkpoint
    from .engine import Trainer, check_resume

    log = log or (lambda m: click.echo(m, err=False))
    overrides = overrides_from_flags(**flags)
    if resume:  # refused or finished: said before anything is built or written
        ckpt = load_checkpoint(resume)
        cfg = resume_run_config(ckpt, resume, config_path, overrides)
        finished = check_resume(ckpt, cfg, resume)
        del ckpt  # the trainer reads it again once the data and the model are built
        if finished:
            log(f"fa-train: {finished}")
            return None
    else:
        cfg = check_config(load_config(config_path, overrides))
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone writes the run folder
        check_output_folder(cfg["out"])
    trainer = Trainer(cfg, log=log, progress=not quiet)
    return trainer.fit(resume=resume)


def resume_run_config(ckpt: dict, path: str, config_path, overrides: dict) -> dict:
    """The validated config of a resumed run: the checkpoint's config < preset < flags. The run folder defaults
    to the checkpoint's folder (not to the preset's `out`, nor to runs/exp)."""
    from .checkpoint import CheckpointError

    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume {path}: the checkpoint holds no run configuration (not a training "
                              f"checkpoint of fa-train); to start a new run from its weights, pass it as --init")
    overrides = dict(overrides, out=overrides.get("out", os.path.dirname(path) or "."))
    return check_config(resume_config(saved, config_path, overrides))


if __name__ == "__main__":
    main()
