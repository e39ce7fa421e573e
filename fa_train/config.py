"""Run configuration: defaults < YAML preset (`--config`) < command-line flags. The resolved config is
saved in the run folder and in every checkpoint, so a run can be rebuilt and resumed from it alone."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict

import yaml

DEFAULTS: Dict[str, Any] = {
    # model options left None take the builder's default (YOLOv3: width/depth; Faster R-CNN: the rest)
    "model": {"name": "yolov3", "width_mult": None, "depth_mult": None, "backbone": None, "fpn_channels": None,
              "min_size": None, "max_size": None, "trainable_layers": None, "weights": None,
              "weights_backbone": None, "box_batch_size_per_image": None},
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
               "ssfa_weight": None, "kdfa_weight": None, "teacher": None},
    "device": "auto",
    "out": "runs/exp",
}


class ConfigError(ValueError):
    pass


def deep_update(base: dict, upd: dict, path: str = "") -> dict:
    for k, v in upd.items():
        if k not in base:
            raise ConfigError(f"unknown config key {path + k!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            deep_update(base[k], v, path + k + ".")
        else:
            base[k] = v
    return base


def load_config(path: str = None, overrides: dict = None) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: file not found")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        try:
            deep_update(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        deep_update(cfg, overrides)
    return cfg


def dump_config(cfg: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)
