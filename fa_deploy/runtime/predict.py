"""Any model file as one model with `predict(images)`: a fa-train checkpoint (`.pt`, `.safetensors`), an ONNX file,
a pipeline manifest or a TensorRT engine (`fa_deploy.load(path)`), and `fa-predict`'s work on image files:
pictures with boxes, COCO-format results in original image coordinates, optional YOLO text files, and the same
images attacked (PGD from the source weights) side by side.

Every deployed file runs through the same Backend interface as in the benchmark and shares the source model's
`postprocess`, so the detections of a checkpoint and of its exports differ only by the network.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from fa_deploy.report.pictures import _draw
from fa_deploy.report.tables import write_json
from fa_deploy.runtime.backends import TorchBackend
from fa_deploy.runtime.loading import check_backend_source, load_backend, recorded_source
from fa_deploy.runtime.metadata import sha256

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


class PredictError(ValueError):
    pass


def is_checkpoint(path: str) -> bool:
    return path.lower().endswith(CHECKPOINT_SUFFIXES)


class Predictor:
    """A checkpoint or a deployed file as a detector. `predict(images)` takes image files, HxWx3 uint8 arrays (any
    size: letterboxed here, boxes mapped back to the original pixels) or a float batch [N,3,S,S] in [0,1] (already
    letterboxed: boxes in its pixels), and returns per image a dict of numpy `boxes` (xyxy), `scores`, `labels` and
    `names`."""

    def __init__(self, path: str, device: str = "auto", providers: Optional[List[str]] = None,
                 img_size: Optional[int] = None, batch_size: Optional[int] = None):
        from fa_train.engine import resolve_device
        from fa_train.models import create_model

        self.path = path
        self.device = resolve_device(device)
        self.source = None  # the torch model, for checkpoints (attacks need its gradients)
        if is_checkpoint(path):
            from fa_train.models import load_model


            model, ckpt = load_model(path)
            self.source = model.to(self.device).eval()
            self.model = self.source
            self.backend = TorchBackend(self.source, path=path, device=self.device)
            self.class_names = list(ckpt.get("class_names") or [])
            size = (ckpt.get("config") or {}).get("data", {}).get("img_size")
        else:

            self.backend = load_backend(path, providers)
            rec = recorded_source(self.backend, path)
            arch = rec.get("model")
            if not isinstance(arch, dict) or "name" not in arch:
                raise PredictError(f"{path}: no record of the model it was exported from (sidecar, manifest or ONNX "
                                   f"metadata): cannot decode its outputs")
            arch = dict(arch)
            # parameter-free post-processing only: the network itself is the file's
            self.model = create_model(arch.pop("name"), arch.pop("num_classes"), **arch).eval()
            side = getattr(self.backend, "sidecar", None) or {}
            self.class_names = list(side.get("classes") or rec.get("classes") or [])
            size = rec.get("img_size")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.model.num_classes)]
        self.img_size = int(img_size or size or 416)
        if self.img_size % 32:
            raise PredictError(f"--img-size {self.img_size}: must be a multiple of 32")
        rng = getattr(self.backend, "batch_range", None)
        self.batch_size = int(batch_size or (rng[1] if rng else 8))
        self.name = os.path.basename(path)

    # -- inputs
    def prepare(self, images) -> tuple:
        """(float batch [N,3,S,S], metas or None, originals or None)."""
        from fa_train.data import letterbox, load_image

        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.ndim == 4
                                                 and images.dtype != np.uint8):
            x = torch.as_tensor(images, dtype=torch.float32)
            if x.dim() != 4 or x.shape[1] != 3:
                raise PredictError(f"images: expected [N,3,S,S] floats in [0,1], got {tuple(x.shape)}")
            return x, None, None
        batch, metas, originals = [], [], []
        for im in images:
            arr = load_image(str(im)) if isinstance(im, (str, os.PathLike)) else np.asarray(im)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise PredictError(f"images: expected HxWx3 uint8 arrays or image files, got {arr.dtype} {arr.shape}")
            t, _, meta = letterbox(arr, np.zeros((0, 4), np.float32), self.img_size)
            batch.append(t)
            metas.append(meta)
            originals.append(arr)
        return torch.stack(batch), metas, originals

    def raw(self, x: np.ndarray) -> List[np.ndarray]:
        return self.backend.raw(np.ascontiguousarray(x, dtype=np.float32))

    def detect(self, x: torch.Tensor, metas=None, conf: float = 0.25) -> List[Dict]:
        """Detections of a letterboxed batch, in original pixels when `metas` are given."""
        from fa_train.data import unletterbox_boxes

        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            dets = self.model.postprocess(self.raw(chunk.cpu().numpy()), conf_thres=conf)
            for j, d in enumerate(dets):
                boxes = torch.as_tensor(d["boxes"]).float().cpu()
                if metas is not None:
                    boxes = unletterbox_boxes(boxes, metas[i + j])
                labels = torch.as_tensor(d["labels"]).long().cpu().numpy()
                out.append({"boxes": boxes.numpy(), "scores": torch.as_tensor(d["scores"]).float().cpu().numpy(),
                            "labels": labels, "names": [self.class_names[int(k)] for k in labels]})
        return out

    def predict(self, images, conf: float = 0.25) -> List[Dict]:
        x, metas, _ = self.prepare(images)
        return self.detect(x, metas, conf)


# ---------------------------------------------------------------------------------------------- fa-predict


@dataclass
class PredictSettings:
    source: str
    weights: Optional[str] = None
    backend: Optional[str] = None
    conf: float = 0.25
    out_dir: str = "runs/predict"
    save_txt: bool = False
    img_size: Optional[int] = None
    batch_size: Optional[int] = None
    device: str = "auto"
    attack: Optional[str] = None
    eps: float = 0.03
    steps: int = 10
    quiet: bool = False
    cross_model: bool = False  # --weights and --backend of other weights (or classes): compare anyway

    def validate(self) -> "PredictSettings":
        from fa_train.errors import SettingsError, check_output_dir

        if not self.weights and not self.backend:
            raise SettingsError("give --weights (a checkpoint) or --backend (an exported file), or both")
        if not 0.0 <= self.conf <= 1.0:
            raise SettingsError(f"--conf {self.conf}: must be in [0, 1]")
        if self.attack not in (None, "none", "pgd"):
            raise SettingsError(f"--attack {self.attack}: expected pgd")
        if self.attack == "pgd":
            if not self.weights:
                raise SettingsError("--attack pgd makes the adversarial images from the source weights: give "
                                    "--weights too")
            if not 0.0 < self.eps <= 1.0:
                raise SettingsError(f"--eps {self.eps}: must be in (0, 1]")
            if self.steps < 1:
                raise SettingsError(f"--steps {self.steps}: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingsError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.img_size is not None and (self.img_size < 32 or self.img_size % 32):
            raise SettingsError(f"--img-size {self.img_size}: must be a positive multiple of 32")
        check_output_dir(self.out_dir, "--out")
        return self


def find_images(source: str) -> List[str]:
    """An image file, a folder (its images, sorted) or a glob pattern."""
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise PredictError(f"{source}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
        return files
    if os.path.isfile(source):
        return [source]
    if any(c in source for c in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise PredictError(f"{source}: the pattern matches no images")
        return files
    raise PredictError(f"{source}: no such image, folder or pattern")


def _coco_results(dets: Dict, image_id: int, file: str) -> List[Dict]:
    out = []
    for b, s, l, n in zip(dets["boxes"], dets["scores"], dets["labels"], dets["names"]):
        w, h = float(b[2] - b[0]), float(b[3] - b[1])
        if w <= 0 or h <= 0:
            continue
        out.append({"image_id": image_id, "file_name": file, "category_id": int(l) + 1, "category": n,
                    "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(w, 2), round(h, 2)],
                    "score": round(float(s), 5)})
    return out


def _yolo_lines(dets: Dict, width: int, height: int) -> List[str]:
    lines = []
    for b, s, l in zip(dets["boxes"], dets["scores"], dets["labels"]):
        cx, cy = (b[0] + b[2]) / 2 / width, (b[1] + b[3]) / 2 / height
        w, h = (b[2] - b[0]) / width, (b[3] - b[1]) / height
        lines.append(f"{int(l)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {float(s):.5f}")
    return lines


def _unletterbox_image(x: torch.Tensor, meta: Dict) -> np.ndarray:
    """A letterboxed [3,S,S] float image back to the original HxWx3 uint8 (for side-by-side pictures)."""
    import torch.nn.functional as F

    px, py = meta["pad"]
    h, w = meta["orig_size"]
    sx, sy = meta["scale"]
    nh, nw = int(round(h * sy)), int(round(w * sx))
    crop = x[:, py:py + nh, px:px + nw][None]
    back = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (back.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _picture(path: str, panels: Sequence[tuple], class_names, conf: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    h, w = panels[0][1].shape[:2]
    scale = 6.4 / max(w, h)
    fig, axes = plt.subplots(1, len(panels), figsize=(w * scale * len(panels), h * scale + 0.4), dpi=100,
                             squeeze=False)
    empty = {"boxes": np.zeros((0, 4))}
    for ax, (title, image, dets) in zip(axes[0], panels):
        _draw(ax, image, dets, empty, class_names, None, title, conf, max_boxes=100)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_predict(s: PredictSettings, log: Callable[[str], None] = print) -> Dict:
    """fa-predict: detections of every image in `s.source`; returns a summary (files written, counts, speed).
    A failed run removes the output folder when it created it."""
    made = os.path.abspath(s.out_dir)  # the topmost folder this run creates (validate creates --out)
    while not os.path.exists(os.path.dirname(made)) and os.path.dirname(made) != made:
        made = os.path.dirname(made)
    made = None if os.path.exists(made) else made
    try:
        return _run_predict(s, log)
    except BaseException:
        if made and os.path.isdir(made):
            import shutil

            shutil.rmtree(made, ignore_errors=True)
        raise


def _run_predict(s: PredictSettings, log: Callable[[str], None]) -> Dict:
    from tqdm import tqdm

    s.validate()
    files = find_images(s.source)
    det_model = Predictor(s.backend or s.weights, s.device, img_size=s.img_size, batch_size=s.batch_size)
    attacker = None
    if s.weights and s.backend:  # the same check as fa-bench's: exported from these weights, same classes and size
        attacker = Predictor(s.weights, s.device, img_size=det_model.img_size)
        check_backend_source(det_model.backend, s.backend, attacker.source, s.weights, sha256(s.weights),
                             det_model.img_size, s.cross_model, log=lambda m: log(f"fa-predict: {m}"))
    if s.attack == "pgd":
        attacker = attacker or det_model
        if attacker.img_size != det_model.img_size:
            raise PredictError(f"--weights {s.weights} is for {attacker.img_size} px, --backend {s.backend} for "
                               f"{det_model.img_size} px")
    else:
        attacker = None
    os.makedirs(s.out_dir, exist_ok=True)
    if s.save_txt:
        os.makedirs(os.path.join(s.out_dir, "labels"), exist_ok=True)
    results, written, n_det, t_net = [], [], 0, 0.0
    bs = det_model.batch_size
    bar = tqdm(total=len(files), desc=f"predict ({det_model.name})", unit="img", disable=None if not s.quiet else True)
    for i in range(0, len(files), bs):
        chunk = files[i:i + bs]
        x, metas, originals = det_model.prepare(chunk)
        t0 = time.perf_counter()
        dets = det_model.detect(x, metas, s.conf)
        t_net += time.perf_counter() - t0
        adv_dets = None
        if attacker is not None:
            from fa_train.adversarial.attacks import pgd_attack

            src = attacker.source
            with torch.no_grad():  # the source's own detections are the attack's targets: no ground truth needed
                pseudo = src.postprocess(src.export_module()(x.to(attacker.device)), conf_thres=s.conf)
            targets = [{"boxes": d["boxes"].float(), "labels": d["labels"].long(),
                        "ignore": torch.zeros(len(d["labels"]), dtype=torch.bool, device=d["boxes"].device)}
                       for d in pseudo]
            from fa_train.data.transforms import content_mask

            adv = pgd_attack(src, x.to(attacker.device), targets, eps=s.eps, steps=s.steps, step_size=s.eps / s.steps,
                             mask=content_mask(metas, x.shape[-1], attacker.device))
            adv_dets = det_model.detect(adv.detach().cpu(), metas, s.conf)
        for j, (f, d, meta, orig) in enumerate(zip(chunk, dets, metas, originals)):
            image_id = i + j + 1
            results += _coco_results(d, image_id, f)
            n_det += len(d["scores"])
            stem = os.path.splitext(os.path.basename(f))[0]
            out = os.path.join(s.out_dir, f"{image_id:05d}_{stem}.png" if len(files) > 1 else f"{stem}.png")
            if adv_dets is None:
                panels = [(det_model.name, orig, d)]
            else:  # both as the network saw them (at its input size), so they differ only by the attack
                panels = [(f"{det_model.name}: clean", _unletterbox_image(x[j], meta), d),
                          (f"{det_model.name}: PGD-{s.steps} eps {s.eps:g} from {os.path.basename(s.weights)}",
                           _unletterbox_image(adv[j].detach().cpu(), meta), adv_dets[j])]
            _picture(out, panels, det_model.class_names, s.conf)
            written.append(out)
            if s.save_txt:
                h, w = orig.shape[:2]
                with open(os.path.join(s.out_dir, "labels", f"{stem}.txt"), "w") as fh:
                    fh.write("\n".join(_yolo_lines(d, w, h)) + ("\n" if len(d["scores"]) else ""))
        bar.update(len(chunk))
        bar.set_postfix(img_s=f"{(i + len(chunk)) / max(t_net, 1e-9):.1f}")
    bar.close()
    pred_path = os.path.join(s.out_dir, "predictions.json")

    write_json(results, pred_path)
    summary = {"images": len(files), "detections": n_det, "predictions": pred_path, "pictures": written,
               "model": det_model.path, "img_size": det_model.img_size, "classes": det_model.class_names,
               "network_images_per_s": len(files) / max(t_net, 1e-9)}
    with open(os.path.join(s.out_dir, "summary.json"), "w") as fh:
        json.dump({k: v for k, v in summary.items() if k != "pictures"}, fh, indent=2)
    return summary

