"""The Python API under `fa-train`: `train(config, **overrides)` runs what `fa-train --config config --flag value`
runs and returns a summary of the run; errors are exceptions (the command turns them into messages and exit
codes).

    from fa_train import train
    run = train("configs/demo.yaml", epochs=5, out="runs/base")           # or train({"model": {...}}, ...)
    run["clean"]["AP50"], run["last"]
    at = train(init=run["last"], method="at", epochs=5, out="runs/at")
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union


def train(config: Union[str, dict, None] = None, resume: Optional[str] = None, quiet: bool = True,
          log: Optional[Callable[[str], None]] = None, **overrides) -> dict:
    """`config`: a YAML preset, the preset as a dict (sections model / data / train / method), or None (defaults).
    `overrides`: fa-train's flags by their Python names (epochs=5, width_mult=0.25, data="synth", out=...,
    method="fa", init=...). Returns {"out", "last", "best", "clean": the last evaluation (AP50, stats,
    per_class_AP50) or None for a resumed run that was already finished, "config"}."""
    from .cli import train_from_flags
    from .config import FLAG_KEYS, load_config

    unknown = sorted(set(overrides) - set(FLAG_KEYS))
    if unknown:
        raise TypeError(f"train(): unknown option(s) {unknown}; known: {', '.join(sorted(FLAG_KEYS))}")
    flags = {k: overrides.get(k) for k in FLAG_KEYS}
    clean = train_from_flags(config, resume, quiet, flags, log=log or (lambda m: None))
    out = overrides.get("out") or (os.path.dirname(resume) if resume else load_config(config)["out"])
    return {"out": out, "last": os.path.join(out, "last.pt"),
            "best": os.path.join(out, "best.pt") if os.path.isfile(os.path.join(out, "best.pt")) else None,
            "clean": clean, "config": _saved_config(out)}


def _saved_config(out: str) -> Optional[dict]:
    import yaml

    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)
