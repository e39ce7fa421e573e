"""Inference speed of the full-size YOLOv3 (416 px, batch 1) through torch eager, ONNX Runtime fp32, fp16 and
int8, printed as ratios to eager; on a GPU with TensorRT, the engines are added.

    python bench/inference.py [--img-size 416] [--classes 80] [--iters 20]

Random weights: speed does not depend on them (int8 calibration uses random images). Not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fa_deploy.exporting import onnx_export as ex  # noqa: E402
from fa_deploy.runtime.backends import OrtBackend, TorchBackend, measure_latency  # noqa: E402
from fa_deploy.runtime.tensorrt import tensorrt_available  # noqa: E402
from fa_train.models import create_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model("yolov3", args.classes).eval()
    x = np.random.default_rng(0).random((1, 3, args.img_size, args.img_size), dtype=np.float32)
    d = tempfile.mkdtemp(prefix="fa-bench-inference-")
    fp32 = os.path.join(d, "yolov3.fp32.onnx")
    ex.export_fp32(model, fp32, args.img_size, dynamic_batch=False)
    fp16 = os.path.join(d, "yolov3.fp16.onnx")
    ex.export_fp16(fp32, fp16, model.export_keep_float32)
    int8 = os.path.join(d, "yolov3.int8.onnx")
    cal = [np.random.default_rng(i).random((1, 3, args.img_size, args.img_size), dtype=np.float32) for i in range(8)]
    ex.export_int8(fp32, int8, cal, model.export_keep_float32)
    backends = [("torch eager fp32", TorchBackend(model)), ("onnxruntime fp32", OrtBackend(fp32)),
                ("onnxruntime fp16", OrtBackend(fp16)), ("onnxruntime int8", OrtBackend(int8))]
    ok, why = tensorrt_available()
    if ok:
        from fa_deploy.runtime.backends import TrtBackend
        from fa_deploy.exporting.tensorrt_build import build_engine

        for prec, path in (("fp32", fp32), ("fp16", fp16), ("int8", int8)):
            eng = path.replace(".onnx", ".engine")
            meta = build_engine(path, eng, ex.INPUT_NAME, args.img_size)
            ex.write_sidecar(eng, {**meta, "precision": prec})
            backends.append((f"tensorrt {prec}", TrtBackend(eng)))
    print(f"YOLOv3 ({args.classes} classes) {args.img_size} px, batch 1, {torch.get_num_threads()} threads; "
          f"median of {args.iters} after warm-up")
    print(f"{'backend':<18} {'ms/img':>8} {'p90':>8} {'post ms':>8} {'x eager':>8}")
    base = None
    for name, b in backends:
        lat = measure_latency(b, model.postprocess, x, warmup=3, iters=args.iters)
        base = base or lat["ms_median"]
        print(f"{name:<18} {lat['ms_median']:8.1f} {lat['ms_p90']:8.1f} {lat['post_ms_median']:8.2f} "
              f"{base / lat['ms_median']:7.2f}x")
    if not ok:
        print(f"TensorRT: {why}; engines skipped")


if __name__ == "__main__":
    main()
