#!/usr/bin/env bash
# Smoke test on a laptop: echo-tiny (d = 128, pattern M-*-M-*-, SPEC §8's synthetic size) trained by the same
# launcher on the CPU, 2 processes over gloo with tensor parallelism 2 + sequence parallelism, mock data.
#   bash examples/pretrain_echo_tiny_cpu.sh            # writes runs/echo-tiny-cpu/checkpoints
# Extra arguments override, e.g. --tensor-model-parallel-size 1 (then the 2 processes are data parallel).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/environment.sh"
RUN_DIR=${RUN_DIR:-runs/echo-tiny-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nproc-per-node 2 -m echo_megatron.pretrain --cpu --echo-preset echo-tiny --mock-data \
    --tensor-model-parallel-size 2 --sequence-parallel --micro-batch-size 2 --global-batch-size 4 \
    --seq-length 256 --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine \
    --lr-warmup-iters 2 --log-interval 1 --save "$RUN_DIR/checkpoints" --save-interval 10 \
    --eval-interval 10 --eval-iters 2 "$@"
