#!/usr/bin/env bash
# The Dual-Tuning demo scenario (issue: model update) through the CLI, on Fashion-MNIST:
# old = SmallCNN on 5 classes, few epochs; gallery features + DRQ codes from it; then three new
# WideCNN models trained on all 10 classes: independent (must be refused), BCT, Dual-Tuning.
# Usage: bench/model_update.sh [STORE_URI]   (default: a fresh local store under .codeshard/)
set -euo pipefail
STORE=${1:-file://$PWD/.codeshard/update-demo}
export CODESHARD_STORE="$STORE"
CS=".venv/bin/codeshard"
$CS ingest fashion-mnist
$CS train-backbone --dataset fashion-mnist --arch small-cnn --model-id fmnist-old-5cls --classes 0,1,2,3,4 --epochs 3
$CS extract --dataset fashion-mnist --model fmnist-old-5cls
$CS train-coder --dataset fashion-mnist --features fmnist-old-5cls --method drq --bits 64
$CS encode --dataset fashion-mnist --features fmnist-old-5cls --coder drq-64-fmnist-old-5cls
for m in independent bct dual-tuning; do
  $CS update-model --dataset fashion-mnist --old fmnist-old-5cls --arch wide-cnn --method $m --epochs 4 || true
done
