#!/usr/bin/env bash
# Reproduce the paper's Table 1 (PASCAL VOC: YOLOv3 and Faster R-CNN FPN, every method, trained with PGD-1/2/3)
# and Table 2 (MS-COCO: YOLOv3, every method, PGD-1) on GPUs, then fill both tables beside the paper's numbers.
#
#   scripts/reproduce_paper.sh VOCDEVKIT COCO_ROOT DARKNET53_CONV74 RESNET50_PTH [OUT]
#
#   VOCDEVKIT          folder with VOC2007/ and VOC2012/
#   COCO_ROOT          folder with annotations/instances_{train,val,minival,valminusminival}2014.json and train2014/, val2014/
#   DARKNET53_CONV74   darknet53.conv.74 (ImageNet Darknet-53 backbone) for YOLOv3
#   RESNET50_PTH       torchvision's ImageNet ResNet-50 checkpoint (resnet50-0676ba61.pth) for Faster R-CNN
#   OUT                results folder (default runs/paper)
#
# Environment: NPROC (GPUs per node; default: all that nvidia-smi lists), TABLES ("1 2"), DETECTORS ("yolov3
# fasterrcnn"), STEPS ("1 2 3"), METHODS ("at tod kdfa ssfa fa"), EPS_MODE ("code": train eps 0.01*k as the paper's
# code; "text": 0.01 as its text), DRY_RUN=1 (print the commands only).
# Each stage is skipped when its eval.json (training) or JSON table (fa-bench) exists: rerun to continue.
# Cost: about 30 base-model + 45 fine-tuning runs of the paper's schedules; plan days on 8 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then sed -n 2,20p "$0" >&2; exit 2; fi
VOC=$1; COCO=$2; DARKNET=$3; RESNET=$4; OUT=${5:-runs/paper}
TABLES=${TABLES:-"1 2"}; DETECTORS=${DETECTORS:-"yolov3 fasterrcnn"}; STEPS=${STEPS:-"1 2 3"}
METHODS=${METHODS:-"at tod kdfa ssfa fa"}; EPS_MODE=${EPS_MODE:-code}
BIN=${BIN:-.venv/bin}
if [ -z "${NPROC:-}" ]; then NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0); [ "$NPROC" -ge 1 ] || NPROC=1; fi
if [ "${DRY_RUN:-0}" != 1 ]; then
  for f in "$VOC" "$COCO" "$DARKNET" "$RESNET"; do
    [ -e "$f" ] || { echo "reproduce_paper.sh: $f does not exist" >&2; exit 2; }
  done
fi

run() {  # print, then run unless DRY_RUN
  echo "+ $*"
  if [ "${DRY_RUN:-0}" != 1 ]; then "$@"; fi
}
train() {  # train OUT_DIR ARGS...: skipped when OUT_DIR/eval.json exists
  local out=$1; shift
  if [ -f "$out/eval.json" ]; then echo "= $out done"; return; fi
  if [ "$NPROC" -gt 1 ]; then
    run "$BIN/torchrun" --nproc_per_node "$NPROC" -m fa_train.cli "$@" --sync-bn --out "$out" --quiet
  else
    run "$BIN/fa-train" "$@" --out "$out" --quiet
  fi
}
bench() {  # bench JSON WEIGHTS...
  local json=$1; shift
  if [ -f "$json" ]; then echo "= $json done"; return; fi
  local args=()
  for w in "$@"; do args+=(--weights "$w"); done
  if [ "$NPROC" -gt 1 ]; then
    run "$BIN/torchrun" --nproc_per_node "$NPROC" -m fa_deploy.cli --attack pgd "${args[@]}" --json "$json" --quiet
  else
    run "$BIN/fa-bench" --attack pgd "${args[@]}" --json "$json" --quiet
  fi
}
eps_for() { if [ "$EPS_MODE" = code ]; then echo "0.0$1"; else echo 0.01; fi; }

for table in $TABLES; do
  if [ "$table" = 1 ]; then
    for det in $DETECTORS; do
      if [ "$det" = yolov3 ]; then cfg=configs/paper_voc_yolov3.yaml; init=(--init "$DARKNET")
      else cfg=configs/paper_voc_frcnn.yaml; init=(--weights-backbone "$RESNET"); fi
      base=$OUT/voc_${det}_base
      train "$base" --config "$cfg" --data "voc:$VOC" "${init[@]}"
      for k in $STEPS; do
        weights=("$base/best.pt")
        for m in $METHODS; do
          train "$OUT/voc_${det}_${m}_pgd$k" --config "$cfg" --data "voc:$VOC" --init "$base/best.pt" \
                --method "$m" --pgd-steps "$k" --train-eps "$(eps_for "$k")"
          weights+=("$OUT/voc_${det}_${m}_pgd$k/best.pt")
        done
        bench "$OUT/table1_${det}_pgd$k.json" "${weights[@]}"
      done
    done
  elif [ "$table" = 2 ]; then
    cfg=configs/paper_coco_yolov3.yaml
    base=$OUT/coco_yolov3_base
    train "$base" --config "$cfg" --data "coco:$COCO" --init "$DARKNET"
    weights=("$base/best.pt")
    for m in $METHODS; do
      train "$OUT/coco_yolov3_${m}_pgd1" --config "$cfg" --data "coco:$COCO" --init "$base/best.pt" \
            --method "$m" --pgd-steps 1 --train-eps 0.01
      weights+=("$OUT/coco_yolov3_${m}_pgd1/best.pt")
    done
    bench "$OUT/table2.json" "${weights[@]}"
  fi
done
run "$BIN/python" scripts/paper_tables.py "$OUT"
