"""The images a checkpoint names: the data it was trained on (its config), unless a flag overrides it. fa-export
calibrates and verifies on them, fa-bench attacks them."""
from __future__ import annotations


def checkpoint_data(ckpt: dict, data=None, img_size=None):
    """(data spec, image size, synth seed): the flags when given, else what the checkpoint was trained on."""
    dcfg = ckpt.get("config", {}).get("data", {})
    return data or dcfg.get("spec", "synth"), img_size or dcfg.get("img_size", 416), dcfg.get("synth_seed", 0)


def dataset_for(ckpt: dict, role: str, data=None, img_size=None, split=None, max_images=None, log=print,
                flag: str = "--data"):
    """The dataset of `role`; when the data spec came from the checkpoint and cannot be read, the error says so and
    names `flag`, the command's flag that overrides it. The split: `split` when given, else the checkpoint's own
    split of that role (fa-train's --test-split / --train-split) when the data is the checkpoint's, else the
    dataset's default."""
    from fa_train.data import DataError, build_dataset

    spec, size, seed = checkpoint_data(ckpt, data, img_size)
    if split is None and not data:
        split = ckpt.get("config", {}).get("data", {}).get(f"{role}_split")
    try:
        return build_dataset(spec, role, size, split, max_images, seed, log=log)
    except DataError as e:
        if data:
            raise
        raise DataError(f"{e} (the data {spec!r} is stored in the checkpoint; give {flag} to use other data or "
                        f"another path)") from None
