"""Darknet `.weights` files: read and write, full model or backbone only (the `darknet53.conv.74` cut).

Layout: int32 major, minor, revision; `seen` as int64 (int32 before version 0.2); then float32 per
convolution in cfg order: BN bias, BN weight, running mean, running var (or the conv bias when the
convolution has no BN), then the conv weight. A file must be consumed exactly, to the last float.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch


class DarknetWeightsError(ValueError):
    pass


def _tensors(conv, bn):
    if bn is not None:
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    return [conv.bias, conv.weight]


def load_darknet_weights(model, path: str, backbone_only: Optional[bool] = None) -> int:
    """Load `path` into `model` (a YoloV3). Returns the number of convolutions loaded.

    `backbone_only=None` decides from the file size: a file that holds exactly the Darknet-53 convolutions
    (like `darknet53.conv.74`) loads the backbone; otherwise the whole network must be in the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            header = np.fromfile(f, dtype=np.int32, count=3)
            if len(header) < 3:
                raise DarknetWeightsError(f"{path}: too short for a Darknet header")
            major, minor, _ = (int(v) for v in header)
            seen_dtype = np.int64 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else np.int32
            np.fromfile(f, dtype=seen_dtype, count=1)
            data = np.fromfile(f, dtype=np.float32)
    except OSError as e:
        raise DarknetWeightsError(f"{path}: cannot read ({e})") from e

    convs = model.darknet_convs()
    n_backbone = model.num_backbone_convs
    need = [sum(t.numel() for t in _tensors(c, b)) for c, b in convs]
    full, backbone = sum(need), sum(need[:n_backbone])
    if backbone_only is None:
        backbone_only = len(data) == backbone and len(data) != full
    count = n_backbone if backbone_only else len(convs)
    expected = backbone if backbone_only else full
    if len(data) != expected:
        what = "backbone (darknet53.conv.74 cut)" if backbone_only else "full network"
        raise DarknetWeightsError(
            f"{path}: holds {len(data)} floats after the header, but the {what} of this model "
            f"({model.num_classes} classes, width {model.cfg.width_mult}, depth {model.cfg.depth_mult}) needs "
            f"{expected} (full network {full}, backbone {backbone}); the file is for another architecture")
    offset = 0
    with torch.no_grad():
        for conv, bn in convs[:count]:
            for t in _tensors(conv, bn):
                n = t.numel()
                t.copy_(torch.from_numpy(data[offset:offset + n].copy()).view_as(t))
                offset += n
    return count


def save_darknet_weights(model, path: str, backbone_only: bool = False, seen: int = 0) -> None:
    convs = model.darknet_convs()
    if backbone_only:
        convs = convs[:model.num_backbone_convs]
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.array([0, 2, 5], dtype=np.int32).tofile(f)
        np.array([seen], dtype=np.int64).tofile(f)
        for conv, bn in convs:
            for t in _tensors(conv, bn):
                t.detach().cpu().float().numpy().astype(np.float32).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
