#!/usr/bin/env bash
# Small-scale replication on this CPU: standard, AT, TOD, KDFA, SSFA and FA (PGD-1) on the embedded shapes
# dataset with the demo's small YOLOv3, 3 seeds each, then one table with mean and spread.
#
#   scripts/replicate_small.sh [OUT]          (default OUT=runs/replicate; about 1-1.5 h on 2 cores)
#
# Per seed: a standard base model (the demo's 30-epoch recipe, which is also the KDFA teacher), then every
# method fine-tuned from it for the same number of epochs at the same learning rate (standard included, so
# every row has seen the same number of updates), then fa-bench --attack pgd over the six models.
# A stage whose eval.json / bench.json exists is skipped, so an interrupted run continues where it stopped.
# SEEDS, EPOCHS (fine-tuning), BASE_EPOCHS, METHODS can be overridden from the environment; EXTRA is appended to
# every fa-train command and BENCH_EXTRA to fa-bench (the tests run a miniature with them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/replicate}
SEEDS=${SEEDS:-"1 2 3"}
EPOCHS=${EPOCHS:-5}
METHODS=${METHODS:-"standard at tod kdfa ssfa fa"}
BASE_EPOCHS=${BASE_EPOCHS:-30}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
read -r -a BENCH_ARGS <<< "${BENCH_EXTRA:-}"
BIN=${BIN:-.venv/bin}
[ -x "$BIN/fa-train" ] || { echo "replicate_small.sh: $BIN/fa-train not found; run 'make venv' first" >&2; exit 2; }
start=$(date +%s)
for seed in $SEEDS; do
  dir=$OUT/seed$seed
  if [ ! -f "$dir/base/eval.json" ]; then
    "$BIN/fa-train" --config configs/demo.yaml --seed "$seed" --epochs "$BASE_EPOCHS" --eval-every 0 \
      ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} --out "$dir/base" --quiet
  fi
  weights=()
  for m in $METHODS; do
    if [ ! -f "$dir/$m/eval.json" ]; then
      "$BIN/fa-train" --config configs/demo.yaml --seed "$seed" --method "$m" --pgd-steps 1 --init "$dir/base/last.pt" \
        --epochs "$EPOCHS" --lr 0.0005 --warmup-iters 0 --eval-every 0 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
        --out "$dir/$m" --quiet
    fi
    weights+=(--weights "$dir/$m/last.pt")
  done
  if [ ! -f "$dir/bench.json" ]; then
    "$BIN/fa-bench" --attack pgd "${weights[@]}" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --json "$dir/bench.json.tmp" \
      --markdown "$dir/bench.md" --quiet
    mv "$dir/bench.json.tmp" "$dir/bench.json"
  fi
  echo "replicate_small.sh: seed $seed done after $(( ($(date +%s) - start) / 60 )) min"
done
"$BIN/python" scripts/replicate_table.py "$OUT" $(for s in $SEEDS; do echo "$OUT/seed$s/bench.json"; done)
echo "replicate_small.sh: finished in $(( ($(date +%s) - start) / 60 )) min; table in $OUT/replicate.md and $OUT/replicate.json"
