"""fa_train: adversarial training of object detectors with feature alignment (KDFA, SSFA).

`fa_train.train(config, **overrides)` is the Python API under `fa-train` (fa_train/api.py), imported on first use."""

__version__ = "0.1.0"
__all__ = ["train"]


def __getattr__(name):
    if name == "train":
        from .api import train

        return train
    raise AttributeError(f"module 'fa_train' has no attribute {name!r}")
