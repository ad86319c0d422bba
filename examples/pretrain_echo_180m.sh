#!/usr/bin/env bash
# Echo-180M (paper / SPEC §8): d = 768, 24 blocks of (mixer, Koopman MLP), SKA at blocks {8, 16}
# (r = 48, 12 heads, P = 64, S = 64), Mamba-2 elsewhere, vocabulary 32000.
#   bash examples/pretrain_echo_180m.sh                                  # one node, mock data
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer/ bash examples/pretrain_echo_180m.sh
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash examples/pretrain_echo_180m.sh   # on each node
# Table of parameters, layout, memory and throughput estimates: examples/README.md.
set -euo pipefail
PRESET=echo-180m
# Layout: pure data parallelism (TP = PP = 1); tensor parallelism would only add communication at d = 768.
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}  # 0.5M tokens per step
SEQ_LEN=${SEQ_LEN:-2048}
LR=${LR:-6e-4}  # GPT-3 Small/Medium range
TRAIN_TOKENS=${TRAIN_TOKENS:-3700000000}  # 20 tokens per parameter (Chinchilla)
WARMUP_TOKENS=${WARMUP_TOKENS:-50000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
