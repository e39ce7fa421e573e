#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: proves the GPU half of fa-toolkit (CUDA kernels, AMP training,
# PGD on CUDA, TensorRT engines, ONNX Runtime GPU providers). Every part ends PASS, FAIL or SKIPPED (with its
# reason); a failure never stops the run. Writes OUT/summary.md and OUT/summary.json, one log per part.
set -u

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--python PY] [--only PARTS] [--detectors LIST]
                            [--rehearse] [--dry-run] [--help]

Runs on a machine with an NVIDIA GPU and torch built with CUDA (TensorRT and onnxruntime-gpu optional), offline:
  kernels      python -m cuda_kernels build (CPU + CUDA sources)
  gpu-tests    the tests that skip without CUDA / TensorRT (tests/test_kernels.py -k cuda, TensorRT engine tests)
  kernel-bench bench/kernels.py: the CUDA table (eager vs fused, % of copy bandwidth)
  train-yolo   a few AMP training steps of every method (standard at tod kdfa ssfa fa), tiny YOLOv3 on synth
  train-frcnn  the same for a tiny Faster R-CNN
  bench-pgd    fa-bench --attack pgd on CUDA
  trt-export   fa-export --engine fp16 --engine int8 (YOLOv3 and Faster R-CNN)      [needs TensorRT]
  trt-bench    fa-bench --backend over the engines                                    [needs TensorRT]
  ort-gpu      fa-bench --backend ONNX files with --provider cuda, then tensorrt      [needs onnxruntime-gpu]
  detectors    RetinaNet, FCOS, SSDlite320 and YOLOv8 (with the ultralytics extra), tiny, on CUDA: AMP standard
               and fa training, fa-bench --attack suite, fa-export fp16 / int8 (and fp16 engines with TensorRT),
               fa-bench --backend --threat all through their twins
Each part: PASS / FAIL / SKIPPED (reason). Summary: OUT/summary.md and OUT/summary.json (default OUT: runs/gpu_check).

  --out DIR      where logs, checkpoints, exports and the summary go
  --wheels DIR   a folder of wheels for missing small dependencies (installed with pip --no-index); without it,
                 parts whose dependencies are missing are SKIPPED with the reason
  --python PY    the interpreter (default: .venv/bin/python if present, else python3)
  --only PARTS   run only these parts (comma-separated names above); the others SKIPPED ("not selected")
  --detectors L  the detectors part's models (default retinanet,fcos,ssdlite,yolov8)
  --rehearse     run the parts' commands on the CPU (no --amp): checks this script where no GPU is; the summary
                 says "rehearsal on the CPU": never GPU results
  --dry-run      check the machine and print the plan; every part SKIPPED ("dry run"); a valid summary

Fill DIR on a connected machine with the same Python version and platform:
  pip download -d DIR pycocotools defusedxml safetensors onnx onnxconverter-common click pyyaml tqdm matplotlib \
      pillow ninja pytest onnxruntime-gpu cuda-python "tensorrt-cu12>=10.9,<11"
(TensorRT's libraries come from NVIDIA's index through the tensorrt-cu12 package: download it where that works.)
EOF
}

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/runs/gpu_check"
WHEELS=""
PY=""
DRY=0
ONLY=""
DETS="retinanet,fcos,ssdlite,yolov8"
REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY=",$(echo "$2" | tr -d ' '),"; shift 2 ;;
    --detectors) DETS="$2"; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PARTS=",kernels,gpu-tests,kernel-bench,train-yolo,train-frcnn,bench-pgd,trt-export,trt-bench,ort-gpu,detectors,"
for p in ${ONLY//,/ }; do
  [ "${PARTS#*,$p,}" = "$PARTS" ] \
    && { echo "gpu_check.sh: --only: no part named $p (parts: ${PARTS:1:${#PARTS}-2})" >&2; exit 2; }
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || echo python3)"; fi
fi
mkdir -p "$OUT/logs" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" FA_KERNELS_BUILD="$OUT/kernels" FA_CACHE="$OUT/cache"
START=$(date +%s)
RESULTS="$OUT/results.tsv"
: > "$RESULTS"

record() {  # name status seconds reason
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"
  printf '%-13s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# part NAME "why it would be skipped, or empty" command...
part() {
  local name="$1" skip="$2"; shift 2
  if [ -n "$ONLY" ] && [ "${ONLY#*,$name,}" = "$ONLY" ]; then record "$name" SKIPPED 0 "not selected (--only)"; return; fi
  if [ "$DRY" = 1 ]; then record "$name" SKIPPED 0 "dry run${skip:+ (would skip: $skip)}"; return; fi
  if [ -n "$skip" ]; then record "$name" SKIPPED 0 "$skip"; return; fi
  local t0=$(date +%s) log="$OUT/logs/$name.log"
  ( "$@" ) > "$log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local note; note=$(grep '^note: ' "$log" | tail -n 1 | cut -c7- | tr '\t' ' ')
  if [ $rc = 0 ]; then record "$name" PASS "$dt" "log: logs/$name.log${note:+; $note}"
  else record "$name" FAIL "$dt" "exit $rc; last line: $(tail -n 1 "$log" | tr '\t' ' ' | cut -c1-160)"; fi
}

probe() { "$PY" - "$@" 2>/dev/null; }

# -- the machine ------------------------------------------------------------------------------------------------
HAVE_PY=1; "$PY" -c "import sys" 2>/dev/null || HAVE_PY=0
MISSING=""
if [ $HAVE_PY = 1 ]; then
  MISSING=$(probe <<'EOF'
import importlib.util
need = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow", "pycocotools": "pycocotools",
        "click": "click", "yaml": "pyyaml", "tqdm": "tqdm", "defusedxml": "defusedxml", "safetensors": "safetensors",
        "onnx": "onnx", "onnxconverter_common": "onnxconverter-common", "matplotlib": "matplotlib", "pytest": "pytest",
        "ninja": "ninja", "onnxruntime": "onnxruntime-gpu"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))
EOF
)
fi
if [ -n "$MISSING" ] && [ -n "$WHEELS" ] && [ "$DRY" = 0 ]; then
  echo "installing from $WHEELS: $MISSING"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" $MISSING > "$OUT/logs/wheels.log" 2>&1 \
    || echo "gpu_check.sh: some wheels did not install (logs/wheels.log)"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" >> "$OUT/logs/wheels.log" 2>&1 || true
  MISSING=$(probe <<'EOF'
import importlib.util
need = {"torch": "torch", "torchvision": "torchvision", "pycocotools": "pycocotools", "defusedxml": "defusedxml",
        "safetensors": "safetensors", "onnx": "onnx", "onnxconverter_common": "onnxconverter-common",
        "click": "click", "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest",
        "onnxruntime": "onnxruntime-gpu"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))
EOF
)
fi
CUDA=""
[ $HAVE_PY = 1 ] && CUDA=$(probe <<'EOF'
try:
    import torch
    print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception:
    print("")
EOF
)
TRT=$(probe <<'EOF'
try:
    import tensorrt
    print(tensorrt.__version__)
except Exception:
    print("")
EOF
)
ORT=$(probe <<'EOF'
try:
    import onnxruntime as o
    print(",".join(p for p in o.get_available_providers() if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")))
except Exception:
    print("")
EOF
)
GPU_NAME="${CUDA:-none}"
DEV=cuda; AMP=--amp
if [ "$REHEARSE" = 1 ]; then  # the commands on the CPU: a check of this script, not of a GPU
  DEV=cpu; AMP=""; CUDA="rehearsal on the CPU"; GPU_NAME="none (rehearsal on the CPU: not GPU results)"
fi
echo "gpu_check: python $PY; GPU: $GPU_NAME; TensorRT: ${TRT:-none}; ONNX Runtime GPU providers: ${ORT:-none}"
[ -n "$MISSING" ] && echo "missing: $MISSING${WHEELS:+ (not in $WHEELS)}"

NO_GPU=""; [ -z "$CUDA" ] && NO_GPU="no CUDA device (torch.cuda.is_available() is False or torch missing)"
NO_DEPS=""; [ -n "$MISSING" ] && NO_DEPS="missing Python packages: $MISSING (give --wheels DIR, see --help)"
NO_TRT=""; [ -z "$TRT" ] && NO_TRT="TensorRT not installed (pip install -e '.[gpu]')"
NO_ORT=""; [ -z "$ORT" ] && NO_ORT="onnxruntime-gpu not installed (no CUDA/TensorRT provider in this ONNX Runtime)"
first() { for r in "$@"; do [ -n "$r" ] && { echo "$r"; return; }; done; echo ""; }

SYNTH=(--data synth:60 --img-size 64 --workers 0 --max-images 8 --max-test-images 8 --eval-every 0 --quiet)
YOLO=(--width-mult 0.125 --depth-mult 0.2)
FRCNN_CFG="$OUT/frcnn.yaml"
printf 'model: {name: fasterrcnn_resnet50_fpn, backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64}\n' \
  > "$FRCNN_CFG"

train() {  # OUT_DIR fa-train-args... : one epoch of a few AMP steps on $DEV
  local out="$1"; shift
  "$PY" -m fa_train.cli "${SYNTH[@]}" "$@" --device "$DEV" $AMP --batch-size 4 --epochs 1 --out "$out"
}

train_all() {  # model-args... : every method, from one standard checkpoint
  local tag="$1"; shift
  train "$OUT/$tag/standard" "$@" || return 1
  for m in at tod kdfa ssfa fa; do
    train "$OUT/$tag/$m" "$@" --method "$m" --init "$OUT/$tag/standard/last.pt" || return 1
  done
}

gpu_tests() {
  "$PY" -m pytest -q -rs tests/test_kernels.py -k cuda || return 1
  if [ -n "$TRT" ]; then
    "$PY" -m pytest -q -rs tests/test_deploy.py::test_tensorrt_engine_build_and_parity \
      tests/test_frcnn_deploy.py::test_tensorrt_engines_of_the_parts || return 1
  fi
}

trt_export() {
  for tag in yolo frcnn; do
    "$PY" -m fa_deploy.export_cli "$OUT/$tag/fa/last.pt" --onnx fp32 --onnx fp16 --onnx int8 \
      --engine fp16 --engine int8 --calib-images 16 --out "$OUT/$tag/export" \
      --timing-cache "$OUT/trt.cache" || return 1
  done
}

trt_bench() {
  "$PY" -m fa_deploy.bench_cli --weights "$OUT/yolo/fa/last.pt" --device "$DEV" --steps 1,3 --max-images 16 \
    --backend "$OUT/yolo/export/last.fp16.engine" --backend "$OUT/yolo/export/last.int8.engine" --workers 0 \
    --quiet --json "$OUT/trt_bench_yolo.json" --max-drop 1 || return 1
  "$PY" -m fa_deploy.bench_cli --weights "$OUT/frcnn/fa/last.pt" --device "$DEV" --steps 1 --max-images 8 \
    --backend "$OUT/frcnn/export/last.fp16.engine.pipeline.json" --workers 0 --quiet \
    --json "$OUT/trt_bench_frcnn.json" --max-drop 1
}

ort_gpu() {
  local ok=0
  "$PY" -m fa_deploy.bench_cli --weights "$OUT/yolo/fa/last.pt" --device "$DEV" --attack none --max-images 16 \
    --backend "$OUT/yolo/export/last.fp16.onnx" --provider cuda --workers 0 --quiet \
    --json "$OUT/ort_cuda.json" --max-drop 1 || ok=1
  if echo "$ORT" | grep -q Tensorrt; then
    "$PY" -m fa_deploy.bench_cli --weights "$OUT/yolo/fa/last.pt" --device "$DEV" --attack none --max-images 16 \
      --backend "$OUT/yolo/export/last.fp16.onnx" --backend "$OUT/yolo/export/last.int8.onnx" \
      --provider tensorrt --workers 0 --quiet --json "$OUT/ort_tensorrt.json" --max-drop 1 || ok=1
  fi
  return $ok
}

detector_yaml() {  # the model section of a tiny variant
  case "$1" in
    retinanet) echo "{name: retinanet_resnet50_fpn, backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64}" ;;
    fcos) echo "{name: fcos_resnet50_fpn, backbone: resnet18, fpn_channels: 64, min_size: 64, max_size: 64}" ;;
    ssdlite) echo "{name: ssdlite320_mobilenet_v3_large, size: 64, width_mult: 0.25}" ;;
    yolov8) echo "{name: ultralytics, cfg: yolov8n.yaml}" ;;
    *) return 1 ;;
  esac
}

detectors() {  # each detector of --detectors: train, the suite, export, the deployed files through their twins
  local d yaml dir ok=0 skipped="" engines backends
  for d in ${DETS//,/ }; do
    yaml=$(detector_yaml "$d") || { echo "unknown detector $d (retinanet, fcos, ssdlite, yolov8)"; return 2; }
    if [ "$d" = yolov8 ] && ! probe <<< 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ultralytics") is None)'; then
      echo "== $d: SKIPPED (the ultralytics extra is not installed: pip install -e '.[ultralytics]')"
      skipped="$skipped $d"; continue
    fi
    dir="$OUT/detectors/$d"; mkdir -p "$dir"
    printf 'model: %s\n' "$yaml" > "$dir/model.yaml"
    echo "== $d: train (standard, fa) on $DEV"
    train "$dir/standard" --config "$dir/model.yaml" || { ok=1; continue; }
    train "$dir/fa" --config "$dir/model.yaml" --method fa --init "$dir/standard/last.pt" || { ok=1; continue; }
    echo "== $d: fa-bench --attack suite on $DEV"
    "$PY" -m fa_deploy.bench_cli --weights "$dir/fa/last.pt" --device "$DEV" --attack suite --steps 1 \
      --apgd-iterations 2 --max-images 8 --workers 0 --quiet --json "$dir/suite.json" || ok=1
    engines=(--onnx fp16 --onnx int8); [ -n "$TRT" ] && engines+=(--engine fp16)  # never empty (bash 4.2 set -u)
    echo "== $d: fa-export ${engines[*]}"
    "$PY" -m fa_deploy.export_cli "$dir/fa/last.pt" "${engines[@]}" --calib-images 8 \
      --verify-images 4 --out "$dir/export" --timing-cache "$OUT/trt.cache" || { ok=1; continue; }
    backends=(--backend "$dir/export/last.fp16.onnx" --backend "$dir/export/last.int8.onnx")
    [ -n "$TRT" ] && backends+=(--backend "$dir/export/last.fp16.engine")
    echo "== $d: fa-bench --backend --threat all on $DEV"
    "$PY" -m fa_deploy.bench_cli --weights "$dir/fa/last.pt" --device "$DEV" "${backends[@]}" --threat all \
      --steps 1 --max-images 8 --workers 0 --quiet --json "$dir/deploy.json" --max-drop 1 \
      --max-deploy-misses 1 --min-clean-ap 0 || ok=1
  done
  [ -n "$skipped" ] && echo "note: not run:$skipped (the ultralytics extra is not installed)"
  return $ok
}

NO_REH=""; [ "$REHEARSE" = 1 ] && NO_REH="rehearsal on the CPU: this part checks the GPU itself"
part kernels "$(first "$NO_DEPS" "$NO_GPU")" "$PY" -m cuda_kernels build
part gpu-tests "$(first "$NO_DEPS" "$NO_GPU" "$NO_REH")" gpu_tests
part kernel-bench "$(first "$NO_DEPS" "$NO_GPU" "$NO_REH")" "$PY" bench/kernels.py --repeat 100
part train-yolo "$(first "$NO_DEPS" "$NO_GPU")" train_all yolo "${YOLO[@]}"
part train-frcnn "$(first "$NO_DEPS" "$NO_GPU")" train_all frcnn --config "$FRCNN_CFG"
NO_CKPT=""; [ "$DRY" = 0 ] && [ ! -f "$OUT/yolo/fa/last.pt" ] && NO_CKPT="no trained checkpoint (train-yolo did not pass)"
part bench-pgd "$(first "$NO_DEPS" "$NO_GPU" "$NO_CKPT")" "$PY" -m fa_deploy.bench_cli --device "$DEV" \
  --weights "$OUT/yolo/standard/last.pt" --weights "$OUT/yolo/fa/last.pt" --max-images 16 --workers 0 --quiet \
  --json "$OUT/bench_pgd.json"
part trt-export "$(first "$NO_DEPS" "$NO_GPU" "$NO_TRT" "$NO_CKPT")" trt_export
NO_ENG=""; [ "$DRY" = 0 ] && [ ! -f "$OUT/yolo/export/last.int8.engine" ] && NO_ENG="no engines (trt-export did not pass)"
part trt-bench "$(first "$NO_DEPS" "$NO_GPU" "$NO_TRT" "$NO_ENG")" trt_bench
NO_ONNX=""; [ "$DRY" = 0 ] && [ ! -f "$OUT/yolo/export/last.fp16.onnx" ] && NO_ONNX="no ONNX files (trt-export did not run)"
part ort-gpu "$(first "$NO_DEPS" "$NO_GPU" "$NO_ORT" "$NO_ONNX")" ort_gpu
part detectors "$(first "$NO_DEPS" "$NO_GPU")" detectors

# -- summary ----------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
SUMPY="$PY"; [ $HAVE_PY = 1 ] || SUMPY=python3
"$SUMPY" - "$RESULTS" "$OUT" "$GPU_NAME" "${TRT:-none}" "${ORT:-none}" "$TOTAL" "$DRY" "$REHEARSE" <<'EOF'
import json, sys
res, out, gpu, trt, ort, total, dry, rehearse = sys.argv[1:9]
parts = [dict(zip(("part", "status", "seconds", "reason"), l.rstrip("\n").split("\t"))) for l in open(res) if l.strip()]
for p in parts:
    p["seconds"] = int(p["seconds"])
doc = {"gpu": gpu, "tensorrt": trt, "onnxruntime_gpu_providers": ort, "seconds": int(total), "dry_run": dry == "1",
       "rehearsal_on_cpu": rehearse == "1",
       "parts": parts, "passed": sum(p["status"] == "PASS" for p in parts),
       "failed": sum(p["status"] == "FAIL" for p in parts), "skipped": sum(p["status"] == "SKIPPED" for p in parts)}
json.dump(doc, open(f"{out}/summary.json", "w"), indent=2)
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# fa-toolkit GPU check\n\nGPU: {gpu}; TensorRT: {trt}; ONNX Runtime GPU providers: {ort}; "
            f"{int(total)} s{' (dry run)' if dry == '1' else ''}"
            f"{'; REHEARSAL on the CPU: these are not GPU results' if rehearse == '1' else ''}\n\n| part | status | s | reason / log |\n| --- | --- | --- | --- |\n")
    for p in parts:
        f.write(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['reason'].replace('|', '/')} |\n")
    f.write(f"\n{doc['passed']} passed, {doc['failed']} failed, {doc['skipped']} skipped\n")
print(f"summary: {out}/summary.md, {out}/summary.json")
EOF
echo "$(grep -c $'\tPASS\t' "$RESULTS") passed, $(grep -c $'\tFAIL\t' "$RESULTS") failed, $(grep -c $'\tSKIPPED\t' "$RESULTS") skipped"
grep -q $'\tFAIL\t' "$RESULTS" && exit 1
exit 0
