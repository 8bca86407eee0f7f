#!/usr/bin/env bash
# The stage-2 objective study (benchmarks/README.md, "Stage-2 objective study"): stage 2 of each candidate recipe from
# the v2 release's stage-1 autoencoder (E, D; R starts fresh), the rotation bracket at the same images and at the same
# training FLOPs, then probes (weight decay swept per layer on the probe-training rows) and one table.
#
#   STEPS=250 SEEDS="0" OUT=runs/stage2_study bash benchmarks/stage2_study.sh
#
# STEPS x 64 images per candidate (250: 16,000 images, about 15 min per candidate on one busy CPU core);
# ONLY="A C" runs a subset of candidates; THREADS (default 1) torch threads per run. Runs one process at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-250}
SEEDS=${SEEDS:-0}
OUT=${OUT:-runs/stage2_study}
THREADS=${THREADS:-1}
DATA=${DATA:-${TIMM_SPOT_DATA:-../shared/data}/cifar10/train.parquet}
GFLOP_PER_IMAGE=${GFLOP_PER_IMAGE:-5.80}  # stage 2 at 64 px (train_scripts/benchmark.py, benchmarks/results/throughput)
mkdir -p "$OUT"

# the v2 release's autoencoder (E, D, to_rgb) without its repair network: R starts from its initialisation
AE="$OUT/ae_v2_stage1.safetensors"
python - "$AE" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
state = load_file('hub/damage_repair_generator.spot_c10_64_v2/model.safetensors')
save_file({k: v.float().contiguous() for k, v in state.items() if k.startswith(('encoder.', 'decoder.', 'to_rgb.'))},
          sys.argv[1])
EOF

declare -A RECIPES=(
  [A_release]="objective=spot_c10_64_v2"
  [B_coop01]="objective=spot_c10_64_v2 r_coop_mask_weight=0.1"
  [C_coop01_norealhalf]="objective=spot_c10_64_v2 r_coop_mask_weight=0.1 r_real_half_grad=false"
  [D_joint]="objective=spot_c10_64_v2 r_coop_mask_weight=0.1 r_real_half_grad=false update=joint"
  [E_anti_shortcut]="objective=anti_shortcut"
  [H_nohistory]="objective=spot_c10_64_v2 r_coop_mask_weight=0.1 r_real_half_grad=false history=false"
)
ONLY=${ONLY:-"A_release B_coop01 C_coop01_norealhalf D_joint E_anti_shortcut H_nohistory"}
weights=()
labels=()
for seed in $SEEDS; do
  for name in $ONLY; do
    run="$OUT/${name}_s$seed"
    # shellcheck disable=SC2086
    python train_scripts/pretrain.py --config train_scripts/configs/cifar10_64_release.yaml --data "$DATA" \
      --stage 2 --seed "$seed" --no-progress --output-dir "$run" \
      --set init_generator="$AE" threads="$THREADS" batch_size=64 stage2_steps="$STEPS" log_every=25 \
      checkpoint_every=100 figure_every=0 num_workers=1 "snapshots=[0,1.0]" shortcut_every=$((STEPS / 2)) \
      ${RECIPES[$name]} > "$run.log" 2>&1
    weights+=("$run/alexnet_spot.safetensors")
    labels+=("${name}_s$seed")
  done
  images=$((STEPS * 64))
  python benchmarks/rotation_bracket.py --images "$images" --batch-size 64 --threads "$THREADS" --seed "$seed" \
    --data "$DATA" --out "$OUT/rotation_images_s$seed/alexnet_spot.safetensors"
  python benchmarks/rotation_bracket.py --match-flops "$(python -c "print($images * $GFLOP_PER_IMAGE)")" \
    --batch-size 64 --threads "$THREADS" --seed "$seed" --data "$DATA" \
    --out "$OUT/rotation_flops_s$seed/alexnet_spot.safetensors"
  weights+=("$OUT/rotation_images_s$seed/alexnet_spot.safetensors" "$OUT/rotation_flops_s$seed/alexnet_spot.safetensors")
  labels+=("rotation_same_images_s$seed" "rotation_same_flops_s$seed")
done
python benchmarks/probe_cifar10.py --weights "${weights[@]}" --labels "${labels[@]}" --seeds 0 \
  --sweep-wd 0.03 0.1 0.3 --threads "$THREADS" --json "$OUT/probes.json"
runs=()
for l in "${labels[@]}"; do [[ $l == rotation* ]] || runs+=("$l=$OUT/$l"); done
python benchmarks/stage2_study_table.py --probes "$OUT/probes.json" --runs "${runs[@]}" --json "$OUT/table.json" \
  --figure "$OUT/study.png"
