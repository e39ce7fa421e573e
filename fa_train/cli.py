"""`fa-train`: train a detector (standard training; adversarial methods with --method)."""
from __future__ import annotations

import os

import click

from .config import DEFAULTS, check_config, check_output_folder, load_config, overrides_from_flags, resume_config
from .errors import run_cli


def _d(key: str, shown=None) -> str:
    """The help text's default of config `key`: the built-in value, which a --config preset (or, with --resume,
    the checkpoint's configuration) may replace. Flags default to None (not given), so click cannot show it."""
    node = DEFAULTS
    for part in key.split("."):
        node = node[part]
    value = shown if shown is not None else node
    if isinstance(value, bool):
        value = "on" if value else "off"
    return f"[default: {value}, or the preset's]"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML preset (configs/*.yaml)")
@click.option("--model", help="the detector: yolov3 | fasterrcnn_resnet50_fpn | retinanet_resnet50_fpn | "
              "fcos_resnet50_fpn | ultralytics:MODEL.yaml (YOLOv8 / YOLO11 built from Ultralytics' YAML, e.g. "
              "ultralytics:yolov8n.yaml; the optional extra [ultralytics], AGPL-3.0) | ultralytics:PATH.pt (a "
              "trained model) " + _d("model.name"))
@click.option("--trust-checkpoint", is_flag=True, default=None,
              help="read an Ultralytics .pt given as --model ultralytics:PATH.pt (a pickle: loading it runs code "
                   "from the file; without the flag it is refused)")
@click.option("--backbone", help="Faster R-CNN, RetinaNet, FCOS: resnet50 (the paper) | resnet18 | resnet34 | "
              "resnet101")
@click.option("--weights-backbone", help="Faster R-CNN, RetinaNet, FCOS: local torchvision ImageNet (or robust) "
              "ResNet state dict")
@click.option("--width-mult", type=float, help="YOLOv3 channel multiplier (1.0 = Darknet-53 as in the cfg) [default: 1.0, or the preset's]")
@click.option("--depth-mult", type=float, help="YOLOv3 residual-block multiplier [default: 1.0, or the preset's]")
@click.option("--data", help="voc:PATH_TO_VOCdevkit | coco:PATH_TO_COCO | yolo:PATH/data.yaml (Ultralytics "
              "layout; splits are the yaml's keys: train, val, test) | synth[:NUM_IMAGES] (default: synth)")
@click.option("--train-split", help="VOC '2007+2012:trainval', COCO 'train2017' (default by dataset)")
@click.option("--test-split", help="VOC '2007:test', COCO 'val2017' (default by dataset)")
@click.option("--max-images", type=int, help="use only the first N training images")
@click.option("--max-test-images", type=int, help="use only the first N test images")
@click.option("--img-size", type=int, help="letterbox size, a multiple of 32 " + _d("data.img_size"))
@click.option("--epochs", type=int, help="training epochs (with --free-replays m: divided by m) " + _d("train.epochs"))
@click.option("--batch-size", type=int, help="images per optimizer step (the global batch under torchrun) " + _d("train.batch_size"))
@click.option("--lr", type=float, help="initial learning rate " + _d("train.lr"))
@click.option("--warmup-iters", type=int, help="burn-in iterations " + _d("train.warmup_iters"))
@click.option("--schedule", type=click.Choice(["step", "cosine"]), help="step: x0.1 at 2/3 of the run " + _d("train.schedule"))
@click.option("--eval-every", type=int, help="evaluate every N epochs (0: only at the end) " + _d("train.eval_every"))
@click.option("--amp/--no-amp", default=None, help="mixed precision (CUDA only) " + _d("train.amp"))
@click.option("--workers", type=int, help="data-loader worker processes " + _d("data.workers"))
@click.option("--seed", type=int, help="seed of every random draw of the run " + _d("train.seed"))
@click.option("--device", help="auto | cpu | cuda | cuda:N " + _d("device"))
@click.option("--out", help="run folder (config.yaml, last.pt, best.pt, metrics.jsonl, eval.json); "
              "default runs/exp, or with --resume the checkpoint's folder")
@click.option("--init", help="initial weights: a fa-train checkpoint of the same model; YOLOv3: Darknet .weights / "
              "darknet53.conv.74 or a Darknet-53 state dict; Faster R-CNN: a (robust) ImageNet ResNet state dict in "
              "torchvision's layout (module./model. prefixes and robustness-library checkpoints accepted) or a "
              "torchvision Faster R-CNN state dict; RetinaNet / FCOS: the same ResNet layouts or a torchvision "
              "detector of the family; SSDlite: a torchvision mobilenet_v3_large or ssdlite320 state dict; "
              "Ultralytics: a backbone (layers 0..M) or a whole DetectionModel state dict in Ultralytics' layout")
@click.option("--resume", type=click.Path(dir_okay=False),
              help="continue a run from its last.pt, with the configuration stored in it; only the flags given "
                   "(and a --config preset) change it, and only where the run stays the same (--epochs, --device, ...)")
@click.option("--method", type=click.Choice(["standard", "at", "tod", "kdfa", "ssfa", "fa"]),
              help="standard | at (vanilla adversarial) | tod (task-oriented domain) | kdfa | ssfa | fa (kdfa+ssfa) " + _d("method.name"))
@click.option("--pgd-steps", type=int, help="PGD steps k of adversarial training; cost k+1 passes " + _d("method.pgd_steps"))
@click.option("--train-eps", type=float, help="training attack budget eps in [0,1] pixel units (0.03 ~ 7.65/255) " + _d("method.train_eps"))
@click.option("--step-size", "--train-step-size", "step_size", type=float,
              help="training attack step size in [0,1] pixel units (a preset's null: PGD-k eps/k, 2.5 eps/k with "
                   "--random-start; Free AT eps) " + _d("method.step_size"))
@click.option("--alpha", type=float, help="weight of the clean loss; (1-alpha) weighs the adversarial loss " + _d("method.alpha"))
@click.option("--ssfa-weight", type=float, help="beta of equation (3): SSFA, aligned to the student's own clean features " + _d("method.ssfa_weight", "the model's: 10 for YOLOv3"))
@click.option("--kdfa-weight", type=float, help="gamma of equation (3): KDFA, aligned to the teacher's clean features " + _d("method.kdfa_weight", "the model's: 10 for YOLOv3"))
@click.option("--teacher", help="KDFA teacher checkpoint (default: the initial weights, as in the paper)")
@click.option("--random-start/--no-random-start", default=None,
              help="training attack starts uniformly in the eps-ball (clipped to [0,1]) " + _d("method.random_start"))
@click.option("--eps-warmup-epochs", type=float,
              help="budget warm-up: eps (and the step) rise linearly over the first N epochs, per optimizer step "
                   "(0: full budget from the start) " + _d("method.eps_warmup_epochs"))
@click.option("--train-objective", type=click.Choice(["det", "cls", "loc", "tog-vanishing", "mix", "max"]),
              help="what the training attack maximises: det (whole detection loss), cls / loc (one loss domain), "
                   "tog-vanishing; mix: one of them per batch, drawn from the seed; max: per image the strongest "
                   "(largest detection loss) " + _d("method.objective"))
@click.option("--free-replays", type=int,
              help="Free adversarial training: each batch replayed m times, the perturbation carried across "
                   "replays and batches, the epochs divided by m (1: off) " + _d("method.free_replays"))
@click.option("--save-every-steps", type=int, help="also write last.pt every N optimizer steps (0: per epoch only) " + _d("train.save_every_steps"))
@click.option("--save-safetensors", is_flag=True, default=None,
              help="also write last/best weights as .safetensors (no pickle; arch and classes in the metadata)")
@click.option("--sync-bn", is_flag=True, default=None,
              help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)")
@click.option("--bad-images", type=click.Choice(["stop", "skip"]),
              help="a corrupt or inconsistent training image: stop with its name or skip it (counted) " + _d("data.bad_images"))
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
    if isinstance(saved.get("model"), dict) and saved["model"].get("trust_checkpoint"):
        # trust to read a pickle comes from this command line only, never from a file's contents
        saved = dict(saved, model={**saved["model"], "trust_checkpoint": None})
    overrides = dict(overrides, out=overrides.get("out", os.path.dirname(path) or "."))
    return check_config(resume_config(saved, config_path, overrides))


if __name__ == "__main__":
    main()
