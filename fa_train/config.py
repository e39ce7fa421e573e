"""Run configuration: defaults < YAML preset (`--config`) < command-line flags. The resolved config is
saved in the run folder and in every checkpoint, so a run can be rebuilt and resumed from it alone.

A resumed run starts from the configuration stored in its checkpoint instead of the defaults: defaults <
checkpoint < preset < flags (`resume_config`). `check_config` validates the resolved config in one place, for
values from flags and presets alike, and names the flag (and the config key) of every bad value.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, Optional

import yaml

DEFAULTS: Dict[str, Any] = {
    # model options left None take the builder's default (YOLOv3: width/depth; Faster R-CNN: the rest)
    "model": {"name": "yolov3", "width_mult": None, "depth_mult": None, "backbone": None, "fpn_channels": None,
              "min_size": None, "max_size": None, "trainable_layers": None, "weights": None,
              "weights_backbone": None, "box_batch_size_per_image": None,
              # SSDlite320: the fixed square input side torchvision resizes to (320)
              "size": None,
              # Ultralytics (--model ultralytics:SPEC): the YAML name/path or .pt file (a run records a .pt's YAML
              # as a dict); trust_checkpoint: read an Ultralytics pickle (never taken from a checkpoint's config)
              "cfg": None, "trust_checkpoint": None},
    "data": {"spec": "synth", "train_split": None, "test_split": None, "img_size": 416, "max_images": None,
             "max_test_images": None, "workers": 2, "synth_seed": 0,
             # a corrupt/inconsistent training image: stop (the default) or skip it (counted, logged)
             "bad_images": "stop", "loader_timeout": 600},
    "train": {
        # SGD as in the paper's YOLOv3 code base (ultralytics/yolov3, 2019)
        "optimizer": "sgd", "epochs": 30, "batch_size": 16, "lr": 0.002324, "momentum": 0.97, "nesterov": True,
        "weight_decay": 0.0004569, "warmup_iters": 300, "schedule": "step", "lr_drop_at": 2 / 3,
        "amp": True, "seed": 3, "eval_every": 1, "init": None, "max_nonfinite": 10, "save_safetensors": False,
        "save_every_steps": 0, "sync_bn": False,
    },
    # equation (3): --ssfa-weight is beta, --kdfa-weight is gamma (None: the model's default, 10 for YOLOv3)
    "method": {"name": "standard", "pgd_steps": 1, "train_eps": 0.01, "step_size": 0.01, "alpha": 0.5,
               "ssfa_weight": None, "kdfa_weight": None, "teacher": None,
               # the inner attack (issue 22); these defaults are the paper's PGD-1 (clean start, whole loss)
               # step_size None: auto (PGD-k eps/k, 2.5 eps/k from a random start; Free AT eps)
               "random_start": False, "objective": "det", "free_replays": 1, "eps_warmup_epochs": 0},
    "device": "auto",
    "out": "runs/exp",
}

# fa-train's flags (as click names them) and the config key each one sets
FLAG_KEYS: Dict[str, str] = {
    "model": "model.name", "width_mult": "model.width_mult", "depth_mult": "model.depth_mult",
    "backbone": "model.backbone", "weights_backbone": "model.weights_backbone",
    "trust_checkpoint": "model.trust_checkpoint",
    "data": "data.spec", "img_size": "data.img_size", "workers": "data.workers", "max_images": "data.max_images",
    "max_test_images": "data.max_test_images", "train_split": "data.train_split", "test_split": "data.test_split",
    "bad_images": "data.bad_images",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "init": "train.init", "warmup_iters": "train.warmup_iters", "eval_every": "train.eval_every", "amp": "train.amp",
    "schedule": "train.schedule", "save_safetensors": "train.save_safetensors",
    "save_every_steps": "train.save_every_steps", "sync_bn": "train.sync_bn",
    "method": "method.name", "pgd_steps": "method.pgd_steps", "train_eps": "method.train_eps",
    "step_size": "method.step_size", "alpha": "method.alpha", "ssfa_weight": "method.ssfa_weight",
    "kdfa_weight": "method.kdfa_weight", "teacher": "method.teacher",
    "random_start": "method.random_start", "train_objective": "method.objective",
    "free_replays": "method.free_replays", "eps_warmup_epochs": "method.eps_warmup_epochs",
    "device": "device", "out": "out",
}
_KEY_FLAGS = {key: "--" + flag.replace("_", "-") for flag, key in FLAG_KEYS.items()}


class ConfigError(ValueError):
    pass


def deep_update(base: dict, upd: dict, path: str = "", strict: bool = True) -> dict:
    """Update `base` in place from `upd`; a key `base` does not have is an error (`strict`) or left out."""
    for k, v in upd.items():
        if k not in base:
            if not strict:
                continue
            raise ConfigError(f"unknown config key {path + k!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            deep_update(base[k], v, path + k + ".", strict)
        else:
            base[k] = v
    return base


def overrides_from_flags(**flags) -> dict:
    """The nested overrides of the flags that were given (a flag left None was not passed)."""
    out: dict = {}
    for flag, value in flags.items():
        if value is None:
            continue
        *sections, name = FLAG_KEYS[flag].split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return out


def read_preset(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: file not found")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _apply(cfg: dict, path, overrides: Optional[dict]) -> dict:
    """`path`: a YAML preset file, or the preset itself as a dict (the Python API)."""
    if path:
        preset = copy.deepcopy(path) if isinstance(path, dict) else read_preset(path)
        try:
            deep_update(cfg, preset)
        except ConfigError as e:
            raise ConfigError(f"{'config' if isinstance(path, dict) else path}: {e}") from None
    if overrides:
        deep_update(cfg, overrides)
    return cfg


def load_config(path: str = None, overrides: dict = None) -> dict:
    """A new run's config: defaults < preset at `path` < `overrides`."""
    return _apply(copy.deepcopy(DEFAULTS), path, overrides)


def resume_config(saved: dict, path: str = None, overrides: dict = None) -> dict:
    """A resumed run's config: defaults < the checkpoint's config `saved` < preset < `overrides`. Keys added to
    the defaults since the checkpoint was written take their default; keys since removed are left out."""
    return _apply(deep_update(copy.deepcopy(DEFAULTS), copy.deepcopy(saved or {}), strict=False), path, overrides)


def dump_config(cfg: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)


# -- validation

def describe(key: str, value: Any = None) -> str:
    """How a message names a setting: '--batch-size 0 (train.batch_size)', or the key alone without a flag."""
    flag = _KEY_FLAGS.get(key)
    shown = "" if value is None else f" {value}"
    if flag == "--" + key:  # --out, --device: the key says nothing more
        return f"{flag}{shown}"
    return f"{flag}{shown} ({key})" if flag else f"{key}{shown}"


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict, key: str, value) -> None:
    *sections, name = key.split(".")
    node = cfg
    for s in sections:
        node = node[s]
    node[name] = value


def _number(cfg, key, integer=False, lo=None, hi=None, lo_open=False, optional=False, hint=""):
    v = _get(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, str) and not integer:  # PyYAML reads `1e-3` (no dot) as a string
        try:
            v = float(v)
            _set(cfg, key, v)
        except ValueError:
            pass
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"{describe(key, repr(v))}: must be {kind}")
    if not math.isfinite(v):
        raise ConfigError(f"{describe(key, v)}: must be a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise ConfigError(f"{describe(key, v)}: must be {bound}{hint}")
    if hi is not None and v > hi:
        raise ConfigError(f"{describe(key, v)}: must be at most {hi}{hint}")


def _choice(cfg, key, choices, optional=False, shown=None):
    v = _get(cfg, key)
    if v is None and optional:
        return
    if v not in choices:
        raise ConfigError(f"{describe(key, repr(v))}: expected one of {', '.join(map(str, shown or choices))}")


def _flag(cfg, key):
    if not isinstance(_get(cfg, key), bool):
        raise ConfigError(f"{describe(key, repr(_get(cfg, key)))}: must be true or false")


def _file(cfg, key, what):
    v = _get(cfg, key)
    if v is None:
        return
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{describe(key, repr(v))}: must be a file path")
    if not os.path.isfile(v):
        raise ConfigError(f"{describe(key, v)}: {what} not found")


def check_config(cfg: dict) -> dict:
    """Validate a resolved config (from flags, a preset, a checkpoint) before any work; a bad value is a
    ConfigError naming its flag and key. Numbers a preset wrote as strings (`lr: 1e-3`) are converted."""
    from .data import DataError, parse_data_spec
    from .models import available_models

    from .models.faster_rcnn import BACKBONES

    _check_ultralytics(cfg)
    _choice(cfg, "model.name", available_models(),
            shown=[m if m != "ultralytics" else "ultralytics:MODEL.yaml|PATH.pt" for m in available_models()])
    _choice(cfg, "model.backbone", BACKBONES, optional=True)
    for key in ("model.width_mult", "model.depth_mult"):
        _number(cfg, key, lo=0, lo_open=True, optional=True)
    for key in ("model.fpn_channels", "model.min_size", "model.max_size", "model.box_batch_size_per_image",
                "model.size"):
        _number(cfg, key, integer=True, lo=1, optional=True)
    # MobileNetV3 (SSDlite) has 6 stages to train, the ResNets 5
    _number(cfg, "model.trainable_layers", integer=True, lo=0,
            hi=6 if cfg["model"].get("name") == "ssdlite320_mobilenet_v3_large" else 5, optional=True)
    _file(cfg, "model.weights", "detector weights file")
    _file(cfg, "model.weights_backbone", "backbone weights file")

    if not isinstance(cfg["data"]["spec"], str):
        raise ConfigError(f"{describe('data.spec', repr(cfg['data']['spec']))}: expected voc:PATH, coco:PATH or "
                          f"synth[:NUM_IMAGES]")
    try:
        parse_data_spec(cfg["data"]["spec"])
    except DataError as e:
        raise ConfigError(str(e)) from None
    size = cfg["data"]["img_size"]
    _number(cfg, "data.img_size", integer=True, lo=32)
    if size % 32:
        lower, upper = size // 32 * 32, size // 32 * 32 + 32
        raise ConfigError(f"{describe('data.img_size', size)}: must be a multiple of 32 (e.g. "
                          f"{f'{lower} or ' if lower >= 32 else ''}{upper})")
    for key in ("data.max_images", "data.max_test_images"):
        _number(cfg, key, integer=True, lo=1, optional=True)
    _number(cfg, "data.workers", integer=True, lo=0)
    _number(cfg, "data.synth_seed", integer=True)
    _number(cfg, "data.loader_timeout", lo=0)
    _choice(cfg, "data.bad_images", ("stop", "skip"))

    t = "train."
    _choice(cfg, t + "optimizer", ("sgd", "adamw"))
    _number(cfg, t + "epochs", integer=True, lo=1)
    _number(cfg, t + "batch_size", integer=True, lo=1)
    _number(cfg, t + "lr", lo=0)  # 0 is allowed: a run that only evaluates its initial weights
    _number(cfg, t + "momentum", lo=0, hi=1)
    _number(cfg, t + "weight_decay", lo=0)
    _number(cfg, t + "warmup_iters", integer=True, lo=0)
    _choice(cfg, t + "schedule", ("step", "cosine"))
    _number(cfg, t + "lr_drop_at", lo=0, hi=1)
    _number(cfg, t + "seed", integer=True, lo=0)
    _number(cfg, t + "eval_every", integer=True, lo=0, hint=" (0: only at the end)")
    _number(cfg, t + "max_nonfinite", integer=True, lo=1)
    _number(cfg, t + "save_every_steps", integer=True, lo=0, hint=" (0: per epoch only)")
    for key in ("amp", "nesterov", "save_safetensors", "sync_bn"):
        _flag(cfg, t + key)
    init = cfg["train"]["init"]
    if init is not None and (not isinstance(init, str) or not os.path.isfile(init)):
        raise ConfigError(f"{describe(t + 'init', init)}: initial weights file not found")

    m = "method."
    _choice(cfg, m + "name", ("standard", "at", "tod", "kdfa", "ssfa", "fa"))
    _number(cfg, m + "pgd_steps", integer=True, lo=1)
    _number(cfg, m + "train_eps", lo=0, hi=1, hint=" (the budget is in [0,1] pixel units: 0.01 ~ 2.55/255)")
    _number(cfg, m + "step_size", lo=0, hi=1, lo_open=True, optional=True,
            hint=" (in [0,1] pixel units; null: auto)")
    _number(cfg, m + "alpha", lo=0, hi=1, hint=" (the weight of the clean loss)")
    for key in ("ssfa_weight", "kdfa_weight"):
        _number(cfg, m + key, lo=0, optional=True)
    _file(cfg, m + "teacher", "KDFA teacher checkpoint")
    _check_inner_attack(cfg)

    _check_device(cfg["device"])
    if not isinstance(cfg["out"], str) or not cfg["out"].strip():
        raise ConfigError(f"{describe('out', repr(cfg['out']))}: must be a folder path")
    return cfg


ULTRALYTICS_PREFIX = "ultralytics:"


def _check_ultralytics(cfg) -> None:
    """`model.name: ultralytics:SPEC` (--model) becomes name `ultralytics` and `model.cfg` SPEC; the spec is checked
    (the extra installed, the YAML known, a .pt there and, if an Ultralytics pickle, trusted)."""
    m = cfg["model"]
    name, spec = m.get("name"), m.get("cfg")
    if isinstance(name, str) and name.startswith(ULTRALYTICS_PREFIX):
        given = name[len(ULTRALYTICS_PREFIX):]
        if spec is not None and spec != given:
            raise ConfigError(f"{describe('model.name', name)}: and model.cfg {spec!r} name two models")
        m["name"], m["cfg"] = "ultralytics", given
        spec = given
    if m.get("trust_checkpoint") is not None and not isinstance(m["trust_checkpoint"], bool):
        _flag(cfg, "model.trust_checkpoint")
    if m["name"] != "ultralytics":
        if spec is not None:
            raise ConfigError(f"model.cfg {spec!r}: only with --model ultralytics:SPEC")
        return
    from .models.ultralytics_yolo import UltralyticsError, check_spec, check_yaml_dict

    try:
        if isinstance(spec, dict):  # the YAML a run recorded from a .pt
            check_yaml_dict(spec, "model.cfg")
        elif not isinstance(spec, str) or not spec:
            raise ConfigError(f"{describe('model.name', 'ultralytics')}: name the model, e.g. --model "
                              f"ultralytics:yolov8n.yaml or ultralytics:PATH.pt")
        else:
            check_spec(spec, bool(m.get("trust_checkpoint")))
    except UltralyticsError as e:
        raise ConfigError(str(e)) from None
    for key in ("width_mult", "depth_mult", "backbone", "weights_backbone", "fpn_channels", "min_size", "max_size",
                "trainable_layers", "weights", "box_batch_size_per_image", "size"):
        if m.get(key) is not None:
            raise ConfigError(f"{describe('model.' + key, m[key])}: not for an Ultralytics model (its YAML sets the "
                              f"architecture: pick a scale, e.g. yolov8n.yaml or yolov8s.yaml)")


def _check_inner_attack(cfg) -> None:
    """The training attack's options (issue 22), and the combinations that have no meaning. Standard training
    ignores them (a robust preset also serves the base model's stage)."""
    from .adversarial.objectives import OBJECTIVE_CHOICES

    m = "method."
    _flag(cfg, m + "random_start")
    _choice(cfg, m + "objective", OBJECTIVE_CHOICES)
    _number(cfg, m + "free_replays", integer=True, lo=1, hint=" (1: no Free AT)")
    _number(cfg, m + "eps_warmup_epochs", lo=0, hint=" (0: the full budget from the first step)")
    meth = cfg["method"]
    if meth["name"] == "tod" and meth["objective"] != "det":
        raise ConfigError(f"{describe(m + 'objective', meth['objective'])}: --method tod has its own attack (one "
                          f"candidate per loss domain); use --method at with this objective")
    if meth["name"] == "tod" and meth["free_replays"] > 1:
        raise ConfigError(f"{describe(m + 'free_replays', meth['free_replays'])}: not with --method tod (its "
                          f"attack needs a gradient per loss domain)")
    if meth["free_replays"] > 1 and meth["objective"] != "det":
        raise ConfigError(f"{describe(m + 'objective', meth['objective'])}: Free AT (--free-replays "
                          f"{meth['free_replays']}) ascends the training loss's own input gradient; it takes "
                          f"--train-objective det only")


def _check_device(name) -> None:
    import torch

    if name in (None, "auto"):
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{describe('device', repr(name))}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"{describe('device', repr(name))}: expected auto, cpu, cuda or cuda:N")


def check_output_folder(path: str, key: str = "out") -> None:
    """The run folder can be created and written: found out before any work, leaving nothing behind (a folder
    this creates to find out is removed again; the run creates it for good once it is accepted)."""
    from .errors import probe_writable

    try:
        probe_writable(path, keep=False)
    except OSError as e:
        if isinstance(e, NotADirectoryError) and os.path.exists(path):
            raise ConfigError(f"{describe(key, path)}: exists and is not a folder") from None
        raise ConfigError(f"{describe(key, path)}: the run folder cannot be created or written "
                          f"({e.strerror or e})") from None