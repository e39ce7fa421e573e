"""`--init FILE`: the initial weights of a run, read safely and loaded into the part of the model they are for.

Accepted, detected from the file itself (never from its name alone, except Darknet's headerless binary format):

- Darknet `.weights` / `darknet53.conv.74` (YOLOv3 only): the whole network, or the Darknet-53 backbone cut;
- a fa-train checkpoint (`last.pt`, `best.pt`, or `.safetensors` with fa-train's metadata) of the same model;
- a PyTorch state dict, plain or inside a "state_dict" / "model" entry, whose keys fit one of the model's parts
  (`Detector.init_parts`): Faster R-CNN's ResNet body in torchvision's layout (ImageNet or adversarially
  pre-trained ResNets), a torchvision Faster R-CNN, YOLOv3's Darknet-53 in fa-train's module layout, or the
  whole model. Keys may carry the prefixes of the published robust ImageNet checkpoints: "module." (DataParallel),
  "model.", "module.model.", and the MadryLab robustness library's "module.model." with its "module.attacker.model."
  and "module.normalizer." copies (skipped: the attacker holds the same weights, the normaliser is the model's
  input normalisation, compared with this model's).

Anything else is refused with one line naming the file, what was expected and the first keys that did not fit.
Every file is read with `torch.load(weights_only=True)` (or safetensors): a pickle that could run code is refused
the way `load_checkpoint` refuses it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

DARKNET_SUFFIXES = (".weights", ".conv.74")
ROBUSTNESS_COPIES = ("attacker.", "normalizer.")  # MadryLab robustness library: siblings of "model."


class InitError(ValueError):
    """An --init file that cannot initialise this run's model."""


@dataclass
class InitPart:
    """A part of a model an --init state dict can be for: its keys are `module.state_dict()`'s."""

    name: str  # "backbone", "detector", "model"
    module: nn.Module
    layout: str  # what such a file is, for messages: "a torchvision resnet18 state dict (ResNet layout)"
    loads: str  # what is loaded, for the log: "the ResNet body ...; the FPN ... keep their initialisation"
    file_extra: Tuple[str, ...] = ()  # key prefixes a file of this layout may hold that the part has not (fc.)
    reinit: Tuple[str, ...] = ()  # key prefixes whose shapes may differ: left at their initialisation


@dataclass
class InitReport:
    kind: str  # "darknet", "checkpoint", or an InitPart name
    tensors: int
    message: str
    notes: List[str] = field(default_factory=list)


def load_init(model, path: str, log: Callable[[str], None] = print, class_names=None) -> InitReport:
    """Load the --init file `path` into `model`, log what was loaded (which part, how many tensors) and return it.
    `class_names`: the run's classes (a fa-train checkpoint trained for others is noted in the log)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InitError(f"--init {path}: initial weights file not found")
    if path.endswith(DARKNET_SUFFIXES):
        report = _load_darknet(model, path)
    else:
        obj = read_weights(path, "--init")
        if isinstance(obj, dict) and "arch" in obj and isinstance(obj.get("model"), dict):
            report = _load_checkpoint(model, obj, path, class_names)
        else:
            state, how = state_dict_of(obj, path)
            report = load_state_into_part(model, state, path, how)
    for note in report.notes:
        log(f"init: note: {note}")
    log(f"init: {report.message}")
    return report


# ---------------------------------------------------------------------------------------------- reading


def read_weights(path: str, flag: str = "--init"):
    """What `path` holds: torch.load(weights_only=True), or a safetensors file as {"model": tensors, "arch": ...}
    (fa-train's metadata) or a plain {name: tensor}. Unreadable or unsafe files raise InitError in one line."""
    from .checkpoint import CheckpointError, _load_failure, _load_safetensors, exported_model_kind

    exported = exported_model_kind(path)
    if exported:
        raise InitError(f"{flag} {path}: this is an exported model ({exported}), not weights to train from: pass "
                        f"the checkpoint it was exported from")
    if path.endswith(".safetensors"):
        try:
            return _load_safetensors(path)
        except CheckpointError as e:
            if "without fa-toolkit metadata" not in str(e):
                raise InitError(f"{flag} {e}") from None
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a global, truncation, not a torch file
        raise InitError(f"{flag} {_load_failure(path, e)}") from None


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in obj.items())


def state_dict_of(obj, path: str, flag: str = "--init") -> Tuple[Dict[str, torch.Tensor], str]:
    """The state dict inside a loaded file, with the published prefixes stripped; and how it was found, for the log
    ("'state_dict' entry, prefix 'module.' stripped")."""
    how = []
    if not _is_state(obj):
        inner = None
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if _is_state(obj.get(key)):
                    inner = key
                    break
        if inner is None:
            raise InitError(f"{flag} {path}: {_describe_object(obj)}; expected a state dict (tensors by name), a "
                            f"dict with a 'state_dict' or 'model' entry holding one, a fa-train checkpoint or "
                            f"Darknet .weights")
        obj = obj[inner]
        how.append(f"its {inner!r} entry")
    state, stripped, skipped = strip_prefixes(obj)
    if stripped:
        how.append(f"prefix {stripped!r} stripped")
    if skipped:
        how.append(f"{skipped} attacker/normalizer copies skipped")
    return state, ", ".join(how)


def _describe_object(obj) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a dict of {len(obj)} entries ({', '.join(map(repr, list(obj)[:5]))}...) holding {', '.join(kinds)}"
    return f"a {type(obj).__name__}"


def strip_prefixes(state: Dict[str, torch.Tensor]):
    """(state without the wrapper prefixes, the prefix stripped, the number of robustness-library copies skipped).

    Strips "module." or "model." while every key has it; at a level where the keys are "model.*" beside
    "attacker.*" / "normalizer.*" (the robustness library's AttackerModel), the copies are skipped and "model."
    stripped. The skipped normalizer's mean and std are kept under "_normalizer.new_mean" / "_normalizer.new_std"
    for `load_state_into_part` to compare with the model's input normalisation."""
    stripped, skipped, norm = "", 0, {}
    while True:
        keys = list(state)
        if any(k.startswith("model.") for k in keys) and all(k.startswith(("model.",) + ROBUSTNESS_COPIES)
                                                             for k in keys):
            for k in keys:
                if k.startswith("normalizer.new_"):
                    norm["_normalizer." + k[len("normalizer."):]] = state[k]
            skipped += sum(1 for k in keys if k.startswith(ROBUSTNESS_COPIES))
            state = {k: v for k, v in state.items() if k.startswith("model.")}
            keys = list(state)
        for prefix in ("module.", "model."):
            if keys and all(k.startswith(prefix) for k in keys):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                break
        else:
            return {**state, **norm}, stripped, skipped


# ---------------------------------------------------------------------------------------------- loading


def _load_darknet(model, path: str) -> InitReport:
    from .models.darknet import DarknetWeightsError, load_darknet_weights

    if not hasattr(model, "darknet_convs"):
        raise InitError(f"--init {path}: Darknet weights initialise YOLOv3 only, this run trains "
                        f"{model.model_name}; --init takes {_expected(model)}")
    try:
        n = load_darknet_weights(model, path)
    except DarknetWeightsError as e:
        raise InitError(f"--init {e}") from None
    total = len(model.darknet_convs())
    if n == model.num_backbone_convs and n != total:
        part = (f"the Darknet-53 backbone ({n} convolutions); the neck and the {len(model.strides)} YOLO heads "
                f"({total - n} convolutions) keep their initialisation")
    else:
        part = f"the whole network ({n} convolutions)"
    tensors = sum(5 if bn is not None else 2 for _, bn in model.darknet_convs()[:n])
    return InitReport("darknet", tensors, f"Darknet weights from {path}: {part}, {tensors} tensors")


def _load_checkpoint(model, ckpt: dict, path: str, class_names=None) -> InitReport:
    from .checkpoint import CheckpointError, arch_differences, load_into

    theirs = (ckpt.get("arch") or {}).get("name")
    if theirs != model.model_name:
        raise InitError(f"--init {path}: checkpoint is for another model: a fa-train {theirs} checkpoint cannot "
                        f"initialise {model.model_name}; --init takes {_expected(model)}")
    diffs = arch_differences(model.arch_config(), ckpt["arch"], model.structural_arch)
    if diffs:
        raise InitError(f"--init {path}: checkpoint is for another model: {'; '.join(diffs)}")
    try:
        load_into(model, ckpt, path)
    except CheckpointError as e:
        raise InitError(f"--init {' '.join(str(e).split())}") from None
    n = len(ckpt["model"])
    notes = []
    theirs = ckpt.get("class_names")
    if class_names is not None and theirs is not None and list(theirs) != list(class_names):
        notes.append(f"{path} was trained for the classes {list(theirs)}, this run's data has {list(class_names)}: "
                     f"its class outputs start from the checkpoint's order")
    return InitReport("checkpoint", n, f"fa-train checkpoint {path}: the whole model, {n} tensors", notes)


def _expected(model) -> str:
    layouts = [p.layout for p in model.init_parts()]
    if hasattr(model, "darknet_convs"):
        layouts.insert(0, "Darknet .weights (whole network or darknet53.conv.74)")
    layouts.append(f"a fa-train {model.model_name} checkpoint")
    return ", ".join(layouts[:-1]) + " or " + layouts[-1]


def _plain(key: str) -> bool:
    return not key.endswith("num_batches_tracked")  # BatchNorm's counter: present or not, never needed


def _looks_like(keys) -> str:
    ks = set(keys)
    if "conv1.weight" in ks and any(k.startswith("layer1.") for k in ks):
        return "a torchvision ResNet state dict (a Faster R-CNN backbone)"
    if any(k.startswith("backbone.body.") for k in ks) and any(k.startswith("rpn.") for k in ks):
        return "a torchvision Faster R-CNN state dict"
    if any(k.startswith("detector.") for k in ks):
        return "fa-train Faster R-CNN weights"
    if "stem.conv.weight" in ks and any(k.startswith("stages.") for k in ks):
        return "a Darknet-53 state dict (a YOLOv3 backbone)"
    if any(k.startswith("backbone.stem.") for k in ks) and any(k.startswith("branch32.") for k in ks):
        return "fa-train YOLOv3 weights"
    return ""


def _fit(part: InitPart, file_keys: List[str]):
    own = [k for k in part.module.state_dict() if _plain(k)]
    own_set, file_set = set(own), set(file_keys)
    missing = [k for k in own if k not in file_set]
    unexpected = [k for k in file_keys if k not in own_set and not k.startswith(part.file_extra)]
    return missing, unexpected, len(own_set & file_set)


def load_state_into_part(model, state: Dict[str, torch.Tensor], path: str, how: str = "",
                         flag: str = "--init", parts: Optional[List[InitPart]] = None) -> InitReport:
    """Load a state dict (prefixes already stripped) into the part of `model` whose keys it holds exactly."""
    norm = {k: state.pop(k) for k in [k for k in state if k.startswith("_normalizer.")]}
    expected = _expected(model) if parts is None else " or ".join(p.layout for p in parts)
    parts = parts if parts is not None else model.init_parts()
    name = getattr(model, "model_name", "the model")
    file_keys = [k for k in state if _plain(k)]
    fits = [(p, *_fit(p, file_keys)) for p in parts]
    exact = [f for f in fits if not f[1] and not f[2]]
    if not exact:
        best = max(fits, key=lambda f: f[3])
        seen = _looks_like(file_keys)
        seen = f"it looks like {seen}" if seen else f"its keys start {file_keys[:3]}"
        detail = (f"as {best[0].layout}: missing {best[1][:5]}{' ...' if len(best[1]) > 5 else ''}, unexpected "
                  f"{best[2][:5]}{' ...' if len(best[2]) > 5 else ''}") if best[3] else "no key matches"
        raise InitError(f"{flag} {path}: cannot initialise {name} from it ({len(file_keys)} tensors"
                        f"{', ' + how if how else ''}; {seen}; {detail}); expected {expected}")
    part = exact[0][0]
    own = part.module.state_dict()
    shapes = [k for k in file_keys if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    bad = [k for k in shapes if not k.startswith(part.reinit)]
    if bad:
        listed = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:3])
        raise InitError(f"{flag} {path}: {part.layout} for another size of model: shapes differ (file vs this run's "
                        f"model) at {len(bad)} tensors: {listed}{' ...' if len(bad) > 3 else ''}")
    load = {k: v for k, v in state.items() if k in own and k not in shapes}
    missing, unexpected = part.module.load_state_dict(load, strict=False)
    missing = [k for k in missing if _plain(k) and k not in shapes]
    if missing or [k for k in unexpected if _plain(k)]:  # never expected: the keys were matched above
        raise InitError(f"{flag} {path}: {part.layout} did not load: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    n = len([k for k in load if _plain(k)])
    msg = f"{part.layout} from {path}{' (' + how + ')' if how else ''}: {part.loads}, {n} tensors"
    if shapes:
        msg += f"; {len(shapes)} tensors of another shape left at their initialisation ({', '.join(shapes[:4])})"
    notes = _normalisation_notes(model, norm)
    return InitReport(part.name, n, msg, notes)


def _normalisation_notes(model, norm: dict) -> List[str]:
    """The robustness library's normaliser against the model's own input normalisation (a note when they differ:
    the weights were trained on inputs normalised otherwise, fine-tuning has to adapt to it)."""
    mean, std = norm.get("_normalizer.new_mean"), norm.get("_normalizer.new_std")
    own = model.input_normalization() if hasattr(model, "input_normalization") else None  # None: no model
    if mean is None or std is None or own is None:
        return []
    m0, s0 = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in own)
    m1, s1 = mean.double().flatten(), std.double().flatten()
    if m1.shape == m0.shape and s1.shape == s0.shape and torch.allclose(m1, m0, atol=1e-3) and \
            torch.allclose(s1, s0, atol=1e-3):
        return []
    return [f"the file's normalizer (mean {[round(float(v), 4) for v in m1]}, std "
            f"{[round(float(v), 4) for v in s1]}) differs from {model.model_name}'s input normalisation (mean "
            f"{[round(float(v), 4) for v in m0]}, std {[round(float(v), 4) for v in s0]}): the weights were "
            f"trained on inputs normalised otherwise"]


def load_weights_file(model, path: str, flag: str, parts: List[InitPart]) -> InitReport:
    """A config's weights file (Faster R-CNN's model.weights_backbone, model.weights) into one of `parts`: read
    and unwrapped as --init reads it. `model` (None while it is being built) names the model in messages."""
    obj = read_weights(path, flag)
    if isinstance(obj, dict) and "arch" in obj and isinstance(obj.get("model"), dict):
        raise InitError(f"{flag} {path}: a fa-train checkpoint; pass it as --init (this option takes "
                        f"{' or '.join(p.layout for p in parts)})")
    state, how = state_dict_of(obj, path, flag)
    return load_state_into_part(model, state, path, how, flag=flag, parts=parts)
