#!/usr/bin/env bash
# Equal-budget short trainings for two measured comparisons (CPU, one thread each):
#   perceptual term: discriminator feature matching (fm, the default) vs none
#   streams: full model vs without the cine stream vs without the IR stream (issue: ablations)
# 96-pixel crops keep each run short; the comparison is between runs of equal budget.
# Usage: benchmarks/short_runs.sh CACHE_DIR OUT_DIR [STEPS]
set -euo pipefail
cache=$1; out=$2; steps=${3:-500}
common=(--config default --cache "$cache" --set schedule.max_steps=$steps --set loss.gan_start_step=$((steps / 4))
        --set schedule.val_every=$((steps / 2)) --set threads=1 --set data.num_workers=0 --set data.val_max_slices=24
        --set data.crop=96)
run() { name=$1; shift; vne train "${common[@]}" --out "$out/$name" --resume "$@"; \
        vne export "$out/$name/latest.pt" --out "$out/$name/model.onnx" --exporter torchscript --name "vne-$name"; }
run full-fm
run full-noperc --set loss.perceptual='"none"'
run no-cine --set model.ablate='["cine"]'
run no-ir --set model.ablate='["ir"]'
