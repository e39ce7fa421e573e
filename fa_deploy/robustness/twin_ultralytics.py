"""The twin of an exported Ultralytics YOLOv8 / YOLO11 ONNX file (fp32, fp16, int8): the file's graph, interpreted in
torch (`interpreter.py`), runs the network up to the Detect head's raw outputs, and our Ultralytics wrapper's own code
(`fa_train/models/ultralytics_yolo.py`) runs on them: Ultralytics' `v8DetectionLoss` (task-aligned assigner, CIoU,
DFL, BCE), the per-image and per-object losses, the attack outputs (TOG's slots, the class-score "objectness"), so
the gradient an attack takes is the deployed file's. Predictions are the file's own output (its DFL decode and
sigmoid) through the wrapper's `postprocess`, as every backend runs it.

What is read from the graph (`_taps`, each verified against ONNX Runtime with the outputs, see `twin.verify_twin`):
- per level k, the last convolution of the box branch (`cv2.k.2`: [N, 4 x reg_max, H, W], the DFL logits before
  the decode) and of the class branch (`cv3.k.2`: [N, C, H, W] class logits), found by their weight names, as the
  file stores them (the export keeps them float32 at fp16; at int8 the value after its Q/DQ, as the decode reads it);
- the M-th layer (`features`: the last backbone layer of the YAML, YOLOv8's SPPF, YOLO11's C2PSA), the value leaving
  that module's scope.

The model's own Python network is dropped (the file holds it); the Detect module stays for what the loss reads from
it (strides, class count, reg_max, the fixed DFL projection of `output_slots`' decode); its own convolutions are
never run.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from fa_train.models.ultralytics_yolo import UltralyticsYolo

from fa_deploy.robustness.interpreter import OnnxGraph
from fa_deploy.robustness.twin import OneNetworkTwin, TwinError, conv_output, scope_output


class _FileHoldsIt(nn.Module):
    """In place of a layer of the Python network in a twin: the deployed file computes it; running it is a bug."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.f, self.i = getattr(layer, "f", -1), getattr(layer, "i", None)

    def forward(self, *a):
        raise TwinError(f"layer {self.i} of the twin's Python network ran; the deployed file computes it")


class UltralyticsTwin(OneNetworkTwin, UltralyticsYolo):
    """UltralyticsYolo whose network is the deployed file: `_network` returns the head's raw outputs and the M-th
    layer as the file computes them; loss, per-image / per-object losses, the attack outputs and `postprocess` are
    the wrapper's own, `predict` / `export_module` the file's own output."""

    def __init__(self, arch: dict, graph: OnnxGraph, path: str):
        if not isinstance(arch.get("cfg"), dict):
            raise TwinError(f"{path}: its model description holds no Ultralytics model YAML (cfg)")
        UltralyticsYolo.__init__(self, arch["cfg"], int(arch["num_classes"]), spec=path)
        layers = self.net.model
        for j in range(len(layers) - 1):
            layers[j] = _FileHoldsIt(layers[j])  # the file holds the network
        head = layers[-1]
        self._init_twin({"model": graph}, {"model": path}, path)
        self.input_name = graph.input_names[0]
        self.box_names = [conv_output(graph, f"net.model.{head.i}.cv2.{k}.2") for k in range(head.nl)]
        self.cls_names = [conv_output(graph, f"net.model.{head.i}.cv3.{k}.2") for k in range(head.nl)]
        self.mid_name = self._mid_tap(graph)

    def _mid_tap(self, graph: OnnxGraph) -> str:
        i = self.mid_index
        for scope in (f"model.{i}", f"net/model.{i}", f"model/net/model.{i}"):
            try:
                return scope_output(graph, scope)
            except TwinError:
                continue
        raise TwinError(f"{graph.name}: no node of the M-th layer (model.{i}, the last backbone layer) in the graph")

    def _taps(self) -> List[str]:
        return self.box_names + self.cls_names + [self.mid_name]

    def _network(self, images, stop_at_mid: bool = False):
        if stop_at_mid:
            return None, self._run("model", {self.input_name: images}, [self.mid_name])[0]
        outs = self._run("model", {self.input_name: images}, self._taps())
        nl, n = len(self.box_names), images.shape[0]
        boxes, scores, mid = outs[:nl], outs[nl:2 * nl], outs[-1]
        for b, s in zip(boxes, scores):
            if b.shape[1] != 4 * self.reg_max or s.shape[1] != self.num_classes or b.shape[-2:] != s.shape[-2:]:
                raise TwinError(f"{self.source}: head maps of shapes {tuple(b.shape)} / {tuple(s.shape)}, expected "
                                f"[N, {4 * self.reg_max}, H, W] / [N, {self.num_classes}, H, W]")
        raw = {"boxes": torch.cat([b.reshape(n, 4 * self.reg_max, -1) for b in boxes], -1),
               "scores": torch.cat([s.reshape(n, self.num_classes, -1) for s in scores], -1),
               "feats": boxes}  # the loss and the decode read the levels' sizes (and dtype, device) from these
        return raw, mid


def ultralytics_twin(arch: dict, graph: OnnxGraph, path: str) -> UltralyticsTwin:
    return UltralyticsTwin(arch, graph, path)


__all__ = ["UltralyticsTwin", "ultralytics_twin"]
