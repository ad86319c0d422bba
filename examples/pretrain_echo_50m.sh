#!/usr/bin/env bash
# Echo-50M (paper / SPEC §8): d = 448, 16 blocks of (mixer, Koopman MLP), SKA at blocks {3, 7, 11, 15}
# (r = 56, 7 heads, P = 64, S = 64), Mamba-2 elsewhere, vocabulary 32000.
#   bash examples/pretrain_echo_50m.sh                                   # one node, mock data
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer/ bash examples/pretrain_echo_50m.sh
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash examples/pretrain_echo_50m.sh    # on each node
# Table of parameters, layout, memory and throughput estimates: examples/README.md.
set -euo pipefail
PRESET=echo-50m
# Layout: 50M parameters fit on any GPU many times over, so no model parallelism (TP = PP = 1): every GPU is
# a data-parallel rank and the distributed optimizer shards the optimizer state over all of them.
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}  # 256 x 2048 = 0.5M tokens per step (GPT-3 Small's batch)
SEQ_LEN=${SEQ_LEN:-2048}
LR=${LR:-6e-4}  # GPT-3 Small's peak learning rate
TRAIN_TOKENS=${TRAIN_TOKENS:-1000000000}  # 20 tokens per parameter (Chinchilla)
WARMUP_TOKENS=${WARMUP_TOKENS:-20000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
