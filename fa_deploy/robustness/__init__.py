"""Robustness: attacks on source weights and on deployed files, and fa-bench's work.

    bench.py        fa-bench's work (`run_bench`): the paper's table of checkpoints, --sanity, the deployment
                    harness and gate; then the files (JSON, Markdown, pictures, report)
    harness.py      every backend on the same clean and adversarial images, drift, misses, the gate
    threats.py      who attacks the deployed model (transfer, white-box on the twin, differential)
    twin.py         differentiable twins of deployed files, verified against ONNX Runtime
    interpreter.py  an ONNX graph run by PyTorch node by node, differentiable (what a twin runs)

The attacks themselves are fa_train.adversarial's (one implementation for training and evaluation). Imports run
downhill to fa_deploy.runtime and fa_deploy.report.
"""
