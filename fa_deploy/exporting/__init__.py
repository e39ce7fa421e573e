"""Exporting: a checkpoint to deployable files, and the checks on them before they leave the machine.

    run.py             fa-export's work (`run_export`): every precision asked for, parity, engines, staging
    onnx_export.py     Detector -> ONNX fp32 / fp16 / int8 (int8 calibration through onnxruntime.quantization),
                       sidecars, the parity check against the source weights
    two_network.py     the two-network export of a detector whose whole graph does not convert (Faster R-CNN)
    tensorrt_build.py  ONNX -> TensorRT engine (strongly typed, profiles, timing cache); torch-free
    compat.py          will TensorRT's ONNX parser take this file? a check on the CPU; torch-free

Imports run downhill to fa_deploy.runtime and fa_deploy.report; nothing here imports fa_deploy.robustness.
(The package is not called `export`: `fa_deploy.export` is the public Python API function.)
"""
