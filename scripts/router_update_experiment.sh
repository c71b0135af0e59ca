#!/usr/bin/env bash
# The router-only update experiment on the embedded model, as reported in the README.
#   bash scripts/router_update_experiment.sh [OUT_DIR]      (under an hour on 2 CPU cores)
# Preference data come from the analysis problem stream (seed 0), which never holds a
# held-out question; route changes and pass@k are measured on the held-out set only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/router-update}
RL=.venv/bin/routelens
mkdir -p "$OUT"
$RL trajectories --model demo --task arithmetic --n 3000 --samples-per-problem 2 --temperature 0.8 --seed 0 \
    --out "$OUT/train-traj.jsonl" --no-progress
$RL counterfactual --model demo --trajectories "$OUT/train-traj.jsonl" --only-verified --layers -1 \
    --out "$OUT/cf-train" --no-progress
$RL trajectories --model demo --task arithmetic --heldout --n 500 --samples-per-problem 4 --temperature 0.8 --seed 0 \
    --out "$OUT/heldout-traj.jsonl" --no-progress
$RL counterfactual --model demo --trajectories "$OUT/heldout-traj.jsonl" --only-verified --layers -1 \
    --out "$OUT/cf-heldout" --no-progress
for lr in 1e-5 1e-4 1e-3; do
    $RL router-update --model demo --counterfactual "$OUT/cf-train" --heldout-counterfactual "$OUT/cf-heldout" \
        --lr $lr --out "$OUT/update-lr$lr" --no-progress
    $RL passk --model demo --router-delta "$OUT/update-lr$lr/router_delta.safetensors" --compare --task arithmetic \
        --n 500 --samples 16 --k 1,2,4,8,16 --temperature 0.8 --seed 0 --out "$OUT/passk-lr$lr" --no-progress
done
$RL report "$OUT/cf-heldout" "$OUT/passk-lr1e-5" "$OUT/passk-lr1e-4" "$OUT/passk-lr1e-3" --out "$OUT/report.html"
