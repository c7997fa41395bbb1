#!/usr/bin/env bash
# The training-recipe figures of docs/results.md on one GPU, in one go: the Fashion-MNIST table
# of every loss (bench/losses_table.py) and, beside it on the same device, ResNet-20 on
# CIFAR-10-JPEG at σ = 0.5 with the Gaussian and the consistency loss (configs/cifar10_gpu.py
# and configs/cifar10_consistency.py, Cohen-style training, EPOCHS epochs), each certified on
# 500 test images at n = 10,000. Runs with the machine's python3 (the device image's).
#   bench/gpu_recipes.sh OUT_DIR [FASHION_MNIST_DIR] [CIFAR_ARCHIVE]
set -u
out=$1
fm=${2:-/usr/share/datasets/fashion-mnist}
cifar=${3:-../shared/data/cifar10-jpeg-q75.tar.xz}
epochs=${EPOCHS:-20}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
mkdir -p "$out"
for loss in gaussian consistency; do
  config=configs/cifar10_$loss.py
  [ "$loss" = gaussian ] && config=configs/cifar10_gpu.py
  workdir=runs/cifar_$loss
  flags=(--config=$config --workdir=$workdir --config.train.insta=False
         --config.train.sigma=0.5 --config.train.estimator.epochs=0
         --config.train.epochs=$epochs --config.data_dir=$cifar)
  # certify.py reads the run from its workdir (σ: the run's train.sigma)
  timeout "${CIFAR_TIMEOUT:-470}" bash -c 'python3 train.py "${@:2}" && python3 certify.py \
    --workdir="$1"' _ "$workdir" "${flags[@]}" > "$out/cifar_$loss.log" 2>&1 &
done
timeout "${TABLE_TIMEOUT:-470}" python3 bench/losses_table.py --runs runs/losses --parallel 24 \
  --deadline "${DEADLINE:-300}" --stop-at "${STOP_AT:-420}" -- --config.data_dir="$fm" > "$out/table.log" 2>&1
echo "table: exit $?" >> "$out/table.log"
wait
cp runs/losses/summary.json "$out/" 2>/dev/null
tar czf "$out/results.tgz" runs/losses/summary.json runs/losses/logs runs/*/certify \
  runs/*/metrics.jsonl runs/losses/*/certify runs/losses/*/metrics.jsonl 2>/dev/null
