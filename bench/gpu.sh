#!/usr/bin/env bash
# The benchmark suite on a GPU, in under 8 minutes: run from the repository root.
#   bash bench/gpu.sh [OUT_DIR]
# Uses the python3 on PATH (jax with CUDA, flax, optax, orbax, safetensors, transformers).
# Each benchmark prints ratios against a baseline measured in the same process.
set -uo pipefail
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
run() {  # name, limit seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"; timeout "$limit" "$@" 2>&1 | grep -v "SPMD\|^W1" | tee "$out/$name.txt"
}
run optimizer 90 $py -m bench.optimizer --params 100e6 --repeats 20
run memory 190 $py -m bench.memory --models bert-base roberta-large llama-7b
# 4 train-step compiles (full, LoRA, SIFT simple, SIFT compact) + 2 selection steps; the
# last H200 run needed more than 150 s for them, so this one gets the rest of the 8 minutes.
run train_step 190 $py -m bench.train_step --model bert-base --random_init --batch 32 --seq 128 --steps 10
