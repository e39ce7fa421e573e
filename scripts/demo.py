"""`make demo`: the main job on the embedded shapes dataset, through the real command-line tools.

1. fa-train (standard training) of a small YOLOv3 on the synthetic shapes dataset; prints the clean AP50 table.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)


def run(*args):
    cmd = [os.path.join(BIN, args[0]), *args[1:]]
    print("\n$ " + " ".join(cmd[0:1] and [args[0], *args[1:]]), flush=True)
    subprocess.run(cmd, check=True)


def main():
    t0 = time.time()
    quiet = ["--quiet"] if os.environ.get("CI") else []
    run("fa-train", "--config", "configs/demo.yaml", "--out", "runs/demo/standard", *quiet)
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
