#!/usr/bin/env bash
# Echo-1B (preset echo-1b, 1.28B parameters): d = 2048, 25 blocks of (mixer, Koopman MLP), SKA in every fifth
# block (16 heads, r = 64, P = 128, S = 64), Mamba-2 elsewhere (d_state 128, 8 groups), vocabulary 32000.
#   bash examples/pretrain_echo_1b.sh                                    # one node, mock data
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tokenizer/ bash examples/pretrain_echo_1b.sh
#   NNODES=4 NODE_RANK=0..3 MASTER_ADDR=node0 bash examples/pretrain_echo_1b.sh    # on each node
# Table of parameters, layout, memory and throughput estimates: examples/README.md.
set -euo pipefail
PRESET=echo-1b
# Layout: 1.28B parameters with the distributed optimizer fit one 80 GB GPU (TP = PP = 1, see the memory
# table); data parallelism is the cheapest way to scale out at this size. On 40 GB GPUs use TP=2, which
# also turns on sequence parallelism.
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}  # 512 x 4096 = 2M tokens per step
SEQ_LEN=${SEQ_LEN:-4096}
LR=${LR:-2.5e-4}  # Megatron-LM's hybrid examples (examples/mamba)
TRAIN_TOKENS=${TRAIN_TOKENS:-26000000000}  # 20 tokens per parameter (Chinchilla)
WARMUP_TOKENS=${WARMUP_TOKENS:-200000000}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch "$@"
