"""Ultralytics YOLOv8 / YOLO11 detectors behind the Detector contract (the optional extra `[ultralytics]`, AGPL-3.0).

`--model ultralytics:yolov8n.yaml` builds the network from Ultralytics' own YAML (the scale letter n/s/m/l/x picked
from the name, as Ultralytics does) with our class count; `--model ultralytics:PATH.pt` takes a user's trained model.
An Ultralytics `.pt` is a pickle of whole modules: loading it runs code from the file, so it is read only with
`trust=True` (`--trust-checkpoint`); `convert_checkpoint` writes it once into this project's checkpoint format (the
model's YAML as a dict + a state dict), which loads with `weights_only=True` and so without trust.

What stands where (see the contract in base.py):
- loss: Ultralytics' own `v8DetectionLoss` (task-aligned assigner, CIoU box, DFL, BCE class), its default gains
  (box 7.5, cls 0.5, dfl 1.5), not multiplied by the batch size (Ultralytics' trainer multiplies; this engine's
  learning rate is per mean loss). Domains: box and dfl = localization, cls = classification.
- ignored objects (VOC difficult, COCO crowd): Ultralytics' loss has no ignore flag; they are left out of its targets
  (as Ultralytics' own VOC conversion leaves difficult objects out).
- M-th layer (alignment, `features`): the output of the last backbone layer of the YAML (YOLOv8: SPPF, layer 9;
  YOLO11: C2PSA, layer 10), stride 32.
- objectness: none. TOG's vanishing / fabrication act on each anchor's largest class logit (its detection score is
  the sigmoid of it); in `output_slots` "obj" is a constant logit of 20 (sigmoid 1.0 in float32: every slot is an
  object, its score is its class probability), so TOG-mislabel moves class scores and boxes only.
- export: images -> [N, A, 4 + C] (xyxy input pixels, class probabilities), no NMS; `postprocess` is the project's
  class-wise NMS (every class above the threshold, as the YOLOv3 path), shared by every backend.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import register_model
from .base import Detector, Targets, classwise_nms

PREFIX = "ultralytics:"
EXTRA_HINT = "pip install -e '.[ultralytics]' (Ultralytics is AGPL-3.0)"
NO_OBJECTNESS_LOGIT = 20.0  # "obj" of output_slots: sigmoid(20) == 1.0 in float32


class UltralyticsError(ValueError):
    """A model spec, file or YAML that cannot be used; the message is one line naming it."""


def _process_globals():
    """The functions Ultralytics replaces in other libraries when it is imported (PIL.Image.open, which then
    tries to install a HEIF plugin on any unreadable image; torch.save; cv2's imread / imwrite / imshow)."""
    import PIL.Image

    out = [(PIL.Image, "open", PIL.Image.open), (torch, "save", torch.save)]
    try:
        import cv2

        out += [(cv2, n, getattr(cv2, n)) for n in ("imread", "imwrite", "imshow") if hasattr(cv2, n)]
    except ImportError:
        pass
    return out


def _import_ultralytics():
    """Import Ultralytics with its network features off: no online check, no telemetry (an offline process never
    syncs), quiet; and with the process's other libraries as they were (Ultralytics patches PIL.Image.open, which
    turned this project's "corrupt image" errors into an attempt to pip-install a plugin, torch.save and cv2's
    image I/O on import: they are put back). Raises UltralyticsError when the extra is not installed."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    saved = _process_globals()
    try:
        import ultralytics  # noqa: F401
        from ultralytics.nn import tasks
    except ImportError as e:
        raise UltralyticsError(f"--model ultralytics:...: the Ultralytics package is not installed ({e}); "
                               f"{EXTRA_HINT}") from None
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    return tasks


def available() -> bool:
    try:
        _import_ultralytics()
    except UltralyticsError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- the YAML


def _check_activation(act) -> None:
    """A YAML's `activation` is eval'd by Ultralytics: only `nn.Name(literal, ...)` / `torch.nn.Name(...)`."""
    try:
        call = ast.parse(str(act).strip(), mode="eval").body
        ok = isinstance(call, ast.Call)
        node, names = call.func if ok else None, []
        while ok and isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        ok = ok and isinstance(node, ast.Name) and [node.id] + names[::-1][:-1] in (["nn"], ["torch", "nn"])
        ok = ok and isinstance(getattr(nn, names[0], None), type) and issubclass(getattr(nn, names[0]), nn.Module)
        if ok:
            for a in list(call.args) + [k.value for k in call.keywords]:
                ast.literal_eval(a)
    except (SyntaxError, ValueError, IndexError):
        ok = False
    if not ok:
        raise UltralyticsError(f"activation {act!r}: only a torch.nn module with literal arguments is accepted")


def check_yaml_dict(d, where: str) -> dict:
    """A model YAML (a dict) that builds a plain detection network without running code: every layer a torch /
    Ultralytics nn.Module class (Ultralytics looks module names up in a namespace that also holds functions), the
    activation a torch.nn module, the last layer Ultralytics' `Detect` (YOLOv8 / YOLO11; not Segment, Pose, OBB,
    YOLOE/World heads, not the end-to-end YOLOv10 / YOLO26 heads, whose loss differs)."""
    tasks = _import_ultralytics()
    if not isinstance(d, dict) or not isinstance(d.get("backbone"), list) or not isinstance(d.get("head"), list):
        raise UltralyticsError(f"{where}: not an Ultralytics model YAML (no backbone and head lists)")
    if d.get("activation") is not None:
        _check_activation(d["activation"])
    layers = d["backbone"] + d["head"]
    for i, layer in enumerate(layers):
        if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[2], str)):
            raise UltralyticsError(f"{where}: layer {i} is not [from, repeats, module, args]")
        name = layer[2]
        if name.startswith("nn."):
            cls = getattr(nn, name[3:], None)
        elif name.startswith("torchvision.ops."):
            cls = getattr(torchvision.ops, name[16:], None)
        else:
            cls = vars(tasks).get(name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise UltralyticsError(f"{where}: layer {i} module {name!r} is not a network layer")
    if layers[-1][2] != "Detect" or d.get("end2end"):
        e2e = " (end-to-end)" if d.get("end2end") else ""
        raise UltralyticsError(f"{where}: the last layer is {layers[-1][2]!r}{e2e}; only detection models with "
                               f"Ultralytics' Detect head (YOLOv8, YOLO11, ...) are "
                               f"supported")
    return d


def _jsonable(d: dict) -> dict:
    """The YAML dict as plain JSON types (stored in checkpoints, read back with weights_only=True, and in ONNX
    metadata)."""
    return json.loads(json.dumps(d, default=str))


def load_yaml(name: str) -> dict:
    """Ultralytics' YAML by name (yolov8n.yaml, yolo11s.yaml: the package's own files, the scale from the name) or
    a YAML file path. Never downloads."""
    tasks = _import_ultralytics()
    local = os.path.isfile(name)
    if not local and (os.sep in name or "://" in name):
        raise UltralyticsError(f"--model ultralytics:{name}: YAML file not found")
    try:
        d = tasks.yaml_model_load(name)
    except Exception as e:  # noqa: BLE001  (FileNotFoundError, a YAML error, ...)
        raise UltralyticsError(f"--model ultralytics:{name}: no such Ultralytics model YAML ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if d.get("scales") and not d.get("scale"):
        raise UltralyticsError(f"--model ultralytics:{name}: name the scale ({', '.join(d['scales'])}), e.g. "
                               f"{os.path.splitext(os.path.basename(name))[0]}n.yaml")
    d.pop("yaml_file", None)  # where it was read: not part of the architecture
    return check_yaml_dict(_jsonable(d), f"--model ultralytics:{name}")


# ---------------------------------------------------------------------------------------------- .pt files


def read_pt(path: str, trust: bool = False) -> dict:
    """{"yaml", "state_dict", "names", "trusted"} of a model file: this project's checkpoint of an Ultralytics model
    (safe: weights_only), or with `trust` an Ultralytics .pt (a pickle of modules: loading runs code from it)."""
    if not os.path.isfile(path):
        raise UltralyticsError(f"{path}: file not found")
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        ckpt = None
    if ckpt is not None:
        arch = ckpt["arch"]
        if arch.get("name") != UltralyticsYolo.model_name:
            raise UltralyticsError(f"{path}: a checkpoint of {arch.get('name')!r}, not of an Ultralytics model")
        names = list(ckpt.get("class_names") or [])
        return {"yaml": check_yaml_dict(arch.get("cfg"), path), "state_dict": ckpt["model"], "names": names,
                "trusted": False, "prefixed": True}
    if not trust:
        raise UltralyticsError(
            f"{path}: an Ultralytics .pt is a pickle of whole modules and loading it runs code from the file: pass "
            f"--trust-checkpoint if you trust its source, or convert it once (trusted) into a checkpoint that loads "
            f"without trust: python -m fa_train.models.ultralytics_yolo {path} OUT.pt")
    _import_ultralytics()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user, explicitly
    except Exception as e:  # noqa: BLE001
        raise UltralyticsError(f"{path}: cannot be read as an Ultralytics model ({type(e).__name__}: {e})") from None
    net = (obj.get("ema") or obj.get("model")) if isinstance(obj, dict) else obj
    if not (isinstance(net, nn.Module) and isinstance(getattr(net, "yaml", None), dict)):
        raise UltralyticsError(f"{path}: not an Ultralytics model file (no 'model' with a YAML)")
    d = _jsonable({k: v for k, v in net.yaml.items() if k not in ("yaml_file", "channels")})
    names = getattr(net, "names", None) or {}
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    return {"yaml": check_yaml_dict(d, path), "state_dict": {k: v.float() if v.is_floating_point() else v
                                                              for k, v in net.state_dict().items()},
            "names": names, "trusted": True, "prefixed": False}


def convert_checkpoint(src: str, dst: str, trust: bool = False) -> dict:
    """Read an Ultralytics .pt (needs `trust`: it runs the pickle) and write this project's checkpoint of it (YAML
    dict + state dict + class names), which `load_model`, `--model ultralytics:DST` and every command read safely.
    Returns the checkpoint's arch."""
    from ..checkpoint import atomic_save, versions

    info = read_pt(src, trust=trust)
    nc = int(info["yaml"]["nc"])
    model = UltralyticsYolo(info["yaml"], nc, spec=f"{PREFIX}{dst}")
    sd = info["state_dict"]
    model.load_state_dict(sd if info["prefixed"] else {"net." + k: v for k, v in sd.items()})
    names = info["names"] if len(info["names"]) == nc else [str(i) for i in range(nc)]
    atomic_save({"model": model.state_dict(), "arch": model.arch_config(), "class_names": names,
                 "converted_from": os.path.abspath(src), "versions": versions()}, dst)
    return model.arch_config()


def check_spec(spec: str, trust: bool = False) -> None:
    """Validate `--model ultralytics:SPEC` before any work (the package present, the YAML known, the file there and,
    for an Ultralytics pickle, trusted). Raises UltralyticsError."""
    _import_ultralytics()
    if not spec:
        raise UltralyticsError("--model ultralytics:: name a model YAML (ultralytics:yolov8n.yaml) or a .pt file")
    if spec.endswith((".yaml", ".yml")):
        load_yaml(spec)
    elif spec.endswith((".pt", ".pth")):
        if not os.path.isfile(spec):
            raise UltralyticsError(f"--model ultralytics:{spec}: file not found")
        from ..checkpoint import CheckpointError, load_checkpoint

        try:
            load_checkpoint(spec)
        except CheckpointError:
            if not trust:
                read_pt(spec, trust=False)  # the refusal
    else:
        raise UltralyticsError(f"--model ultralytics:{spec}: expected a model YAML (.yaml) or a model file (.pt)")


# ---------------------------------------------------------------------------------------------- the model


def _hyp():
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    return IterableSimpleNamespace(**DEFAULT_CFG_DICT)


class UltralyticsYolo(Detector):
    model_name = "ultralytics"
    loss_domains = {"cls": ("cls",), "loc": ("box", "dfl")}

    def __init__(self, yaml_dict: dict, num_classes: int, spec: str = ""):
        super().__init__(num_classes)
        tasks = _import_ultralytics()
        self.yaml_dict = check_yaml_dict(_jsonable(yaml_dict), spec or "model YAML")
        self.spec = spec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = tasks.DetectionModel(copy.deepcopy(self.yaml_dict), ch=3, nc=num_classes, verbose=False)
        self.net.args = _hyp()
        head = self.net.model[-1]
        self.reg_max = int(head.reg_max)
        self.strides = tuple(float(s) for s in head.stride)
        self.mid_index = len(self.yaml_dict["backbone"]) - 1
        self.export_keep_float32 = tuple(f"net.model.{head.i}.{part}.{k}.2" for part in ("cv2", "cv3")
                                         for k in range(head.nl))
        self._criterion = None
        self.net.eval()
        with torch.no_grad():  # this class's own network (a twin of a deployed file overrides `_network`)
            mid = UltralyticsYolo._network(self, torch.zeros(1, 3, 64, 64), stop_at_mid=True)[1]
        self.net.train()
        self.mid_channels, self.mid_stride = int(mid.shape[1]), 64 // int(mid.shape[-1])

    def arch_config(self) -> dict:
        return {"name": self.model_name, "num_classes": self.num_classes, "cfg": self.yaml_dict}

    def input_normalization(self):
        """Ultralytics networks take the [0, 1] image as it is (no mean / std inside)."""
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]

    def init_parts(self) -> list:
        """--init state dicts in Ultralytics' own key layout (`DetectionModel.state_dict()`: "model.N...", the
        "model." prefix stripped as for any file): the backbone alone, layers 0..M of the YAML's backbone section
        (e.g. adversarially pre-trained; neck and head keep their initialisation), or the whole network (another
        class count re-initialises the class branch); then this wrapper's own state dict."""
        from ..initial_weights import InitPart

        layers, head = self.net.model, self.net.model[-1]
        last = self.mid_index
        # slices of the Sequential share its modules and keep their indices as keys ("0.conv.weight", ...)
        return [InitPart("backbone", layers[:last + 1],
                         f"an Ultralytics backbone state dict (layers 0-{last} of the YAML, keys model.0. ... "
                         f"model.{last}.)", f"the backbone (layers 0-{last}); the neck and the Detect head keep "
                         f"their initialisation"),
                InitPart("detector", layers, f"an Ultralytics DetectionModel state dict (keys model.0. ... "
                         f"model.{head.i}.)", "the whole network", reinit=(f"{head.i}.cv3.",)),
                *super().init_parts()]

    # -- forward pieces
    @staticmethod
    def _check(images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N,3,H,W] float RGB in [0,1], got shape {tuple(images.shape)}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image size must be a multiple of 32, got {tuple(images.shape[-2:])}")
        return images

    def _network(self, images, stop_at_mid: bool = False):
        """The network layer by layer as Ultralytics' `_predict_once` runs it, returning the Detect head's raw
        outputs {"boxes" [N, 4*reg_max, A], "scores" [N, C, A] logits, "feats"} (train or eval mode alike) and the
        M-th layer's output. Everything else (loss, decode, attack outputs) reads the network through this method:
        the twin of a deployed file (fa_deploy/robustness/twin.py) replaces it with the file's graph."""
        x, y, mid = self._check(images), [], None
        layers = self.net.model
        for m in layers:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if m is layers[-1]:
                return m.forward_head(x, **m.one2many), mid
            x = m(x)
            y.append(x if m.i in self.net.save else None)
            if m.i == self.mid_index:
                mid = x
                if stop_at_mid:
                    return None, mid
        raise RuntimeError("the Ultralytics network has no Detect layer")

    def features(self, images):
        return self._network(images, stop_at_mid=True)[1]

    def _anchor_grid(self, feats, dtype):
        """([A, 2] anchor centres in input pixels, [A, 1] strides), from the feature maps' sizes as Python numbers:
        an exported graph holds them as constants (it has a fixed image size), with no shape arithmetic or casts
        for the fp16 conversion to trip over."""
        pts, strides = [], []
        for f, s in zip(feats, self.strides):
            h, w = int(f.shape[-2]), int(f.shape[-1])
            ys, xs = torch.meshgrid(torch.arange(h, device=f.device, dtype=dtype),
                                    torch.arange(w, device=f.device, dtype=dtype), indexing="ij")
            pts.append((torch.stack((xs, ys), -1).reshape(-1, 2) + 0.5) * s)
            strides.append(torch.full((h * w, 1), s, device=f.device, dtype=dtype))
        return torch.cat(pts), torch.cat(strides)

    def _decode(self, raw):
        """raw head outputs -> (boxes [N, A, 4] xyxy input pixels, class logits [N, A, C]): DFL's expected
        distances (left, top, right, bottom in strides) around each anchor centre."""
        head = self.net.model[-1]
        centres, strides = self._anchor_grid(raw["feats"], raw["boxes"].dtype)
        dist = head.dfl(raw["boxes"]).transpose(1, 2) * strides  # [N, A, 4] pixels
        boxes = torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1)
        return boxes, raw["scores"].transpose(1, 2)

    # -- the loss
    def criterion(self):
        from ultralytics.utils.loss import v8DetectionLoss

        dev = next(self.net.parameters()).device
        if self._criterion is None or self._criterion.device != dev:
            self._criterion = v8DetectionLoss(self.net)
        return self._criterion

    @staticmethod
    def _cast(raw):
        dtype = torch.float64 if raw["scores"].dtype == torch.float64 else torch.float32
        return {"boxes": raw["boxes"].to(dtype), "scores": raw["scores"].to(dtype), "feats": raw["feats"]}

    @staticmethod
    def batch_targets(targets: Targets, size: Tuple[int, int], device) -> Dict[str, torch.Tensor]:
        """Our targets (xyxy input pixels, 0-based labels, `ignore`) as Ultralytics' batch: batch_idx [M], cls [M, 1],
        bboxes [M, 4] cxcywh normalised by the image width and height. Ignored objects are left out."""
        h, w = size
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            b = t["boxes"].to(device, torch.float32).reshape(-1, 4)
            keep = torch.ones(len(b), dtype=torch.bool, device=device)
            if t.get("ignore") is not None:
                keep = ~t["ignore"].to(device).bool().reshape(-1)
            b = b[keep]
            idx.append(torch.full((len(b),), float(i), device=device))
            cls.append(t["labels"].to(device).reshape(-1)[keep].float())
            boxes.append(torchvision.ops.box_convert(b, "xyxy", "cxcywh") / torch.tensor([w, h, w, h], device=device))
        return {"batch_idx": torch.cat(idx) if idx else torch.zeros(0, device=device),
                "cls": (torch.cat(cls) if cls else torch.zeros(0, device=device)).view(-1, 1),
                "bboxes": torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)}

    def _loss(self, raw, targets, size) -> Dict[str, torch.Tensor]:
        crit = self.criterion()
        _, loss, _ = crit.get_assigned_targets_and_loss(self._cast(raw), self.batch_targets(targets, size, crit.device))
        return {"box": loss[0], "cls": loss[1], "dfl": loss[2]}

    def forward_train(self, images, targets: Targets):
        raw, mid = self._network(images)
        return self._loss(raw, targets, images.shape[-2:]), mid

    def loss_terms_per_image(self, images, targets) -> Dict[str, torch.Tensor]:
        """Image i's terms of Ultralytics' loss as if it were a batch of one (its own normaliser, the sum of its
        assigned target scores), from one batched forward."""
        raw, _ = self._network(images)
        return self._loss_rows(raw, targets, images.shape[-2:])

    def _assign(self, raw, targets, size) -> dict:
        """Ultralytics' task-aligned assignment of a batch from one assigner call, with its own pieces (targets,
        decode, assigner): the assigner treats each image on its own (padded objects masked out), so each image is
        assigned as it is alone. Returns the criterion, the predictions (`distri` [N,A,4 x reg_max], `scores`
        [N,A,C], decoded `bboxes` [N,A,4] in stride units), `anchors` / `strides` [A,2] / [A,1], `imgsz`, and the
        assignment: target `boxes` (pixels), soft target `scores`, foreground mask `fg` [N,A] and `gt_idx` [N,A],
        the index among the image's objects that are not ignored, in their order. What `_loss_rows` (each image's
        loss terms) and `object_losses` (each object's loss) read."""
        from ultralytics.utils.tal import make_anchors

        crit = self.criterion()
        preds = self._cast(raw)
        distri = preds["boxes"].permute(0, 2, 1).contiguous()
        scores = preds["scores"].permute(0, 2, 1).contiguous()
        anchors, strides = make_anchors(preds["feats"], crit.stride, 0.5)
        n = scores.shape[0]
        imgsz = torch.tensor(preds["feats"][0].shape[2:], device=crit.device, dtype=scores.dtype) * crit.stride[0]
        batch = self.batch_targets(targets, size, crit.device)
        t = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        t = crit.preprocess(t.to(crit.device), n, scale_tensor=imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = t.split((1, 4), 2)
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)
        bboxes = crit.bbox_decode(anchors, distri)
        _, t_boxes, t_scores, fg, gt_idx = crit.assigner(
            scores.detach().sigmoid(), (bboxes.detach() * strides).type(gt_bboxes.dtype), anchors * strides,
            gt_labels, gt_bboxes, mask_gt)
        return {"crit": crit, "distri": distri, "scores": scores, "bboxes": bboxes, "anchors": anchors,
                "strides": strides, "imgsz": imgsz, "t_boxes": t_boxes, "t_scores": t_scores, "fg": fg,
                "gt_idx": gt_idx}

    def _loss_rows(self, raw, targets, size) -> Dict[str, torch.Tensor]:
        """Each image's (box, cls, dfl) of `v8DetectionLoss.get_assigned_targets_and_loss` as that image alone gets
        them, from one batched assignment (`_assign`), the sums taken per image over its own normaliser (the sum of
        its target scores): one assigner call instead of one per image (the per-image PGD step's cost; tested equal
        to Ultralytics' loss on each image alone)."""
        a = self._assign(raw, targets, size)
        crit, t_scores, strides = a["crit"], a["t_scores"], a["strides"]
        norm = t_scores.sum((1, 2)).clamp(min=1)  # each image's own target_scores_sum
        bce = crit.bce(a["scores"], t_scores.to(a["scores"].dtype))
        if crit.class_weights is not None:
            bce = bce * crit.class_weights
        box, dfl = zip(*(crit.bbox_loss(a["distri"][i:i + 1], a["bboxes"][i:i + 1], a["anchors"],
                                        a["t_boxes"][i:i + 1] / strides, t_scores[i:i + 1], norm[i],
                                        a["fg"][i:i + 1], a["imgsz"], strides) for i in range(len(norm))))
        hyp = crit.hyp
        return {"box": torch.stack(box) * hyp.box, "cls": bce.sum((1, 2)) / norm * hyp.cls,
                "dfl": torch.stack(dfl) * hyp.dfl}

    def object_losses(self, images, targets) -> List[torch.Tensor]:
        """Per image [M_i]: each object's loss, the mean over the anchors the task-aligned assigner gives it of
        box_gain x (1 - CIoU) + dfl_gain x DFL + cls_gain x the anchor's class BCE (summed over classes, against
        the assigner's soft targets); NaN for ignored objects and for objects given no anchor. One batched
        assignment (`_assign`), each image assigned as it is alone."""
        from ultralytics.utils.metrics import bbox_iou
        from ultralytics.utils.tal import bbox2dist

        raw, _ = self._network(images)
        a = self._assign(raw, targets, images.shape[-2:])
        crit = a["crit"]
        hyp = crit.hyp
        out = []
        for i, t in enumerate(targets):
            m = len(t["boxes"])
            res = torch.full((m,), float("nan"), device=images.device, dtype=torch.float32)
            kept = torch.arange(m, device=images.device)
            if t.get("ignore") is not None:
                kept = kept[~t["ignore"].to(images.device).bool().reshape(-1)]
            fg = a["fg"][i]
            if len(kept) and fg.any():
                strides = a["strides"][fg]
                tb = a["t_boxes"][i][fg] / strides
                iou = bbox_iou(a["bboxes"][i][fg], tb, xywh=False, CIoU=True).view(-1)
                loss = hyp.box * (1.0 - iou)
                if crit.bbox_loss.dfl_loss is not None:
                    ltrb = bbox2dist(a["anchors"][fg], tb, self.reg_max - 1)
                    dfl = crit.bbox_loss.dfl_loss(a["distri"][i][fg].view(-1, self.reg_max), ltrb).view(-1)
                    loss = loss + hyp.dfl * dfl
                scores = a["scores"][i][fg]
                loss = loss + hyp.cls * F.binary_cross_entropy_with_logits(
                    scores, a["t_scores"][i][fg].to(scores.dtype), reduction="none").sum(-1)
                obj = a["gt_idx"][i][fg]
                total = loss.new_zeros(len(kept)).index_add(0, obj, loss)
                count = loss.new_zeros(len(kept)).index_add(0, obj, torch.ones_like(loss))
                per = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
                res = res.to(per.dtype).index_put((kept,), per)
            out.append(res)
        return out

    # -- what the attacks read
    def objectness_logits(self, images):
        """{"score": ([N, A] largest class logit of every anchor, None)}: Ultralytics' heads have no objectness; an
        anchor's detection score is the sigmoid of its largest class logit, which TOG's vanishing / fabrication
        drive down / up."""
        raw, _ = self._network(images)
        return {"score": (raw["scores"].max(1).values, None)}

    def output_slots(self, images):
        """Every anchor: decoded box (input pixels, differentiable), "obj" a constant logit 20 (no objectness:
        every slot is an object, its score its class probability), class logits (independent sigmoids)."""
        raw, _ = self._network(images)
        boxes, cls = self._decode(raw)
        obj = torch.full(cls.shape[:2], NO_OBJECTNESS_LOGIT, dtype=cls.dtype, device=cls.device)
        return {"boxes": boxes, "obj": obj, "cls": cls,
                "valid": torch.ones(cls.shape[:2], dtype=torch.bool, device=cls.device), "cls_activation": "sigmoid"}

    # -- deployment
    def export_module(self) -> nn.Module:
        return _UltralyticsExport(self)

    def postprocess(self, raw, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 300,
                    pre_nms_topk: int = 3000, with_class_scores: bool = False):
        """Shared by every backend: raw [N, A, 4 + C] (xyxy, class probabilities; torch or numpy) -> per image the
        detections after class-wise NMS, every (anchor, class) above `conf_thres` a candidate."""
        pred = raw[0] if isinstance(raw, (list, tuple)) else raw
        pred = torch.as_tensor(pred).float()
        return [classwise_nms(p[:, :4], p[:, 4:], conf_thres, iou_thres, max_det, pre_nms_topk,
                              p[:, 4:] if with_class_scores else None) for p in pred]


class _UltralyticsExport(nn.Module):
    """images [N,3,H,W] in [0,1] -> [N, A, 4 + C]: boxes xyxy (input pixels), class probabilities; no NMS."""

    def __init__(self, model: UltralyticsYolo):
        super().__init__()
        self.model = model

    def forward(self, images):
        raw, _ = self.model._network(images)
        boxes, cls = self.model._decode(raw)
        return torch.cat([boxes, cls.sigmoid()], -1)


# ---------------------------------------------------------------------------------------------- builder


@register_model("ultralytics")
def ultralytics_yolo(num_classes: int = 80, cfg=None, trust_checkpoint: bool = False, **kw) -> UltralyticsYolo:
    """`cfg`: a YAML name or path (yolov8n.yaml), a model YAML as a dict (what checkpoints store), or a .pt file
    (this project's checkpoint of an Ultralytics model; an Ultralytics pickle only with `trust_checkpoint`). A .pt's
    weights are loaded; with another class count than the file's, the class layers stay new (the rest is loaded)."""
    if kw:
        raise TypeError(f"ultralytics: unknown options {sorted(kw)} (the YAML sets width and depth: pick a scale, "
                        f"e.g. yolov8n.yaml)")
    if cfg is None:
        raise UltralyticsError("ultralytics: name a model YAML (ultralytics:yolov8n.yaml) or a .pt file")
    if isinstance(cfg, dict):
        return UltralyticsYolo(cfg, num_classes, spec="checkpoint arch")
    spec = str(cfg)
    if spec.endswith((".yaml", ".yml")):
        return UltralyticsYolo(load_yaml(spec), num_classes, spec=PREFIX + spec)
    if not spec.endswith((".pt", ".pth")):
        raise UltralyticsError(f"--model ultralytics:{spec}: expected a model YAML (.yaml) or a model file (.pt)")
    info = read_pt(spec, trust=trust_checkpoint)
    model = UltralyticsYolo(info["yaml"], num_classes, spec=PREFIX + spec)
    sd = info["state_dict"] if info["prefixed"] else {"net." + k: v for k, v in info["state_dict"].items()}
    own = model.state_dict()
    matched = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    left = sorted(set(own) - set(matched))
    if left and int(info["yaml"].get("nc", num_classes)) == num_classes:
        raise UltralyticsError(f"{spec}: its state dict does not match its own YAML (missing {left[:3]})")
    model.transferred = (len(matched), len(own))
    if left:
        warnings.warn(f"{spec}: {len(matched)} of {len(own)} tensors loaded; the class branch ({len(left)} tensors: "
                      f"{info['yaml'].get('nc')} classes in the file, {num_classes} here) starts new")
    return model


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m fa_train.models.ultralytics_yolo SRC.pt DST.pt`: the one trusted read of an Ultralytics .pt,
    written as this project's checkpoint (loads without trust everywhere after)."""
    import argparse

    from ..errors import run_cli

    ap = argparse.ArgumentParser(prog="python -m fa_train.models.ultralytics_yolo",
                                 description=main.__doc__.split(":", 1)[1].strip())
    ap.add_argument("src", help="Ultralytics .pt (a pickle: reading it runs code from it; trust its source)")
    ap.add_argument("dst", help="the checkpoint to write")
    args = ap.parse_args(argv)

    def convert():
        arch = convert_checkpoint(args.src, args.dst, trust=True)
        print(f"wrote {args.dst}: {arch['num_classes']} classes; use --model ultralytics:{args.dst} (fa-train) or "
              f"--weights {args.dst} (fa-bench, fa-export)")

    run_cli("convert", convert)


if __name__ == "__main__":
    main()
