#!/usr/bin/env bash
# Echo-8B (preset echo-8b): Megatron-LM's 8B Mamba-2 hybrid (examples/mamba: 56 layers
# M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-, d = 4096, 4d MLPs, Mamba-2 d_state 128,
# 256k vocabulary, untied embeddings) with SKA (32 heads, r = 128, P = 128, S = 64) in its four '*' layers;
# `--ska-rank 64` trains the former width (cost of each: examples/README.md, scripts/rank_cost.py).
#   bash examples/pretrain_echo_8b.sh                                    # one node, mock data
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer/ bash examples/pretrain_echo_8b.sh
#   NNODES=16 NODE_RANK=0..15 MASTER_ADDR=node0 bash examples/pretrain_echo_8b.sh  # on each node
# Table of parameters, layout, memory and throughput estimates: examples/README.md.
set -euo pipefail
PRESET=echo-8b
# Layout: TP = 4 with sequence parallelism inside a node, as Megatron-LM trains its 8B hybrid: the 8.8B
# parameters and their activations no longer fit one GPU, and TP splits every layer (SKA and Mamba heads,
# MLP width, vocabulary) over NVLink. No pipeline (PP = 1); the remaining GPUs are data parallel.
TP=${TP:-4}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}  # as Megatron-LM's 8B example (see the memory estimate in examples/README.md)
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}  # 1024 x 4096 = 4M tokens per step
SEQ_LEN=${SEQ_LEN:-4096}
LR=${LR:-2.5e-4}  # Megatron-LM's 8B hybrid example: 2.5e-4 cosine to 2.5e-5
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}  # Megatron-LM's example: 300B tokens
WARMUP_TOKENS=${WARMUP_TOKENS:-204800000}  # its 50,000 warm-up samples of 4096 tokens
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch --untie-embeddings-and-output-weights "$@"
