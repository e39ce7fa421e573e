"""fa_deploy: export to ONNX / TensorRT, backends, and the robustness benchmark harness."""
