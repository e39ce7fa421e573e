"""The images a checkpoint names: the data it was trained on (its config), unless a flag overrides it. fa-export
calibrates and verifies on them, fa-bench attacks them."""
from __future__ import annotations


def checkpoint_data(ckpt: dict, data=None, img_size=None):
    """(data spec, image size, synth seed): the flags when given, else what the checkpoint was trained on."""
    dcfg = ckpt.get("config", {}).get("data", {})
    return data or dcfg.get("spec", "synth"), img_size or dcfg.get("img_size", 416), dcfg.get("synth_seed", 0)


def dataset_for(ckpt: dict, role: str, data=None, img_size=None, split=None, max_images=None, log=print):
    from fa_train.data import build_dataset

    spec, size, seed = checkpoint_data(ckpt, data, img_size)
    return build_dataset(spec, role, size, split, max_images, seed, log=log)
