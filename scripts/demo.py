"""`make demo`: the paper's pipeline on the embedded shapes dataset, through the real command-line tools.

1. fa-train: standard training of a small YOLOv3 (the base model, and the KDFA teacher);
2. fa-train --method at / --method fa with PGD-1, both fine-tuned from the base model, as in the paper;
3. fa-bench --attack pgd: clean AP50, PGD-1/3/5/10 AP50, advAP and acAP of the three models in one table;
4. fa-export of the FA model to ONNX fp32, fp16 and int8, then fa-bench --backend: the source and the three
   ONNX files under the three threats (transfer from the source weights, white-box and differential attacks on
   each file's differentiable twin) on the first DEPLOY_IMAGES test images, with the deployment gate;
5. both fa-bench runs also write an HTML + Markdown report (tables, trade-off and PGD-steps plots, the deployment
   drop, and pictures of detections with Grad-CAM on clean and PGD-1 images).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)
OUT = "runs/demo"
# torch's AVX2 kernels (and oneDNN's) on every x86 CPU, unless the user chose: training amplifies the last digits
# of floating-point arithmetic, so on an AVX-512 CPU the default kernels give other tables than the published ones
# (docs/results.md "What reproduces where"); every command below inherits this environment
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
for _k, _v in PINNED.items():
    os.environ.setdefault(_k, _v)
FINETUNE = ["--epochs", "4", "--lr", "0.0005", "--warmup-iters", "0", "--eval-every", "0", "--pgd-steps", "1"]


# the demo within 15 minutes on 2 cores: 20 base epochs (configs/demo.yaml says 30: scripts/replicate_small.sh's
# recipe), 4 fine-tuning epochs, and the deployment stage, which attacks each file twice more (white-box,
# differential), on the first 50 test images
BASE_EPOCHS = "20"
DEPLOY_IMAGES = "50"


def run(*args, gate: bool = False):
    """Run one command; a failure ends the demo with its exit code and one line (the command printed its reason).
    With `gate`, exit code 1 is a gate verdict (printed in the table above), not a failure of the demo."""
    print("\n$ " + " ".join(args), flush=True)
    t0 = time.time()
    code = subprocess.run([os.path.join(BIN, args[0]), *args[1:]]).returncode
    print(f"({args[0]} took {time.time() - t0:.0f} s)", flush=True)
    if code == 1 and gate:
        print(f"demo: the {args[0]} gate failed (see the verdict above); the demo goes on", flush=True)
    elif code:
        print(f"demo: {args[0]} exited with code {code}; stopping", file=sys.stderr, flush=True)
        sys.exit(code if code in (1, 2) else 2)


def main():
    try:
        _main()
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        sys.exit(130)


def _main():
    t0 = time.time()
    quiet = ["--quiet"] if os.environ.get("CI") or not sys.stdout.isatty() else []
    run("fa-train", "--config", "configs/demo.yaml", "--epochs", BASE_EPOCHS, "--out", f"{OUT}/standard", *quiet)
    base = f"{OUT}/standard/last.pt"
    for method in ("at", "fa"):
        run("fa-train", "--config", "configs/demo.yaml", "--method", method, "--init", base, *FINETUNE,
            "--out", f"{OUT}/{method}", *quiet)
    run("fa-bench", "--attack", "pgd", "--weights", base, "--weights", f"{OUT}/at/last.pt",
        "--weights", f"{OUT}/fa/last.pt", "--json", f"{OUT}/bench.json", "--markdown", f"{OUT}/bench.md", "--report", f"{OUT}/report", *quiet)
    run("fa-export", f"{OUT}/fa/last.pt", "--onnx", "fp32", "--onnx", "fp16", "--onnx", "int8",
        "--out", f"{OUT}/fa/export", "--dynamic-batch", "1:16:32")
    exported = [f"{OUT}/fa/export/last.{p}.onnx" for p in ("fp32", "fp16", "int8")]
    run("fa-bench", "--attack", "pgd", "--weights", f"{OUT}/fa/last.pt", *sum((["--backend", e] for e in exported), []),
        "--threat", "all", "--max-images", DEPLOY_IMAGES, "--json", f"{OUT}/deploy.json", "--markdown",
        f"{OUT}/deploy.md", "--report", f"{OUT}/deploy_report", *quiet, gate=True)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; tables in {OUT}/bench.md and {OUT}/deploy.md (and .json); "
          f"reports in {OUT}/report/report.html and {OUT}/deploy_report/report.html", flush=True)


if __name__ == "__main__":
    main()
