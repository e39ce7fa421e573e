"""`make demo`: the paper's pipeline on the embedded shapes dataset, through the real command-line tools.

1. fa-train: standard training of a small YOLOv3 (the base model, and the KDFA teacher);
2. fa-train --method at / --method fa with PGD-1, both fine-tuned from the base model, as in the paper;
3. fa-bench --attack pgd: clean AP50, PGD-1/3/5/10 AP50, advAP and acAP of the three models in one table;
4. fa-export of the FA model to ONNX fp32, fp16 and int8, then fa-bench --backend: the source and the three
   ONNX files on the same adversarial images, with the deployment gate;
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
FINETUNE = ["--epochs", "5", "--lr", "0.0005", "--warmup-iters", "0", "--eval-every", "0", "--pgd-steps", "1"]


def run(*args):
    print("\n$ " + " ".join(args), flush=True)
    subprocess.run([os.path.join(BIN, args[0]), *args[1:]], check=True)


def main():
    t0 = time.time()
    quiet = ["--quiet"] if os.environ.get("CI") or not sys.stdout.isatty() else []
    run("fa-train", "--config", "configs/demo.yaml", "--out", f"{OUT}/standard", *quiet)
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
        "--json", f"{OUT}/deploy.json", "--markdown", f"{OUT}/deploy.md", "--report", f"{OUT}/deploy_report", *quiet)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; tables in {OUT}/bench.md and {OUT}/deploy.md (and .json); "
          f"reports in {OUT}/report/report.html and {OUT}/deploy_report/report.html", flush=True)


if __name__ == "__main__":
    main()
