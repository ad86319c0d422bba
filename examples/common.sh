# Shared by the pretrain_echo_*.sh GPU scripts (sourced, not run): the torchrun rendezvous, layout,
# schedule, data and tokenizer flags, and the launch. Each script first sets PRESET and the defaults of
# TP PP MICRO_BATCH GLOBAL_BATCH SEQ_LEN LR TRAIN_TOKENS WARMUP_TOKENS; every variable can be overridden
# from the environment.
#
#   GPUS_PER_NODE (8)  NNODES (1)  NODE_RANK (0)  MASTER_ADDR (localhost)  MASTER_PORT (6000)
#   DATA_PATH    Megatron --data-path: a prefix written by `echo-megatron preprocess` (PREFIX_text_document)
#                or a blend "0.7 a_text_document 0.3 b_text_document"; unset: --mock-data
#   TOKENIZER_MODEL  local Hugging Face tokenizer directory (required with DATA_PATH)
#   CHECKPOINT_DIR, TENSORBOARD_DIR, DATA_CACHE_DIR  (under ./runs/<preset> by default)
# Extra arguments to a script are appended to the launcher's flags and override them.

source "$(dirname "${BASH_SOURCE[0]}")/environment.sh"

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
RUN_DIR=${RUN_DIR:-runs/${PRESET}}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-${RUN_DIR}/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${RUN_DIR}/tensorboard}
DATA_CACHE_DIR=${DATA_CACHE_DIR:-${RUN_DIR}/data-cache}

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
                  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")

if [[ -n "${DATA_PATH:-}" ]]; then
    : "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer directory used by echo-megatron preprocess}"
    read -r -a DATA_PATHS <<< "$DATA_PATH"  # a blend is "weight prefix weight prefix ..."
    DATA_ARGS=(--data-path "${DATA_PATHS[@]}" --split 99,1,0 --data-cache-path "$DATA_CACHE_DIR"
               --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
else
    # Synthetic tokens; the launcher's --echo-preset sets a NullTokenizer with the preset's vocabulary.
    DATA_ARGS=(--mock-data)
fi

# Layout: tensor parallel TP (with sequence parallel when TP > 1), pipeline parallel PP, and data
# parallel over the remaining GPUS_PER_NODE * NNODES / (TP * PP) ranks.
LAYOUT_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
             --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH")
if (( TP > 1 )); then LAYOUT_ARGS+=(--sequence-parallel); fi

# Schedule in samples of SEQ_LEN tokens: TRAIN_TOKENS in all, linear warm-up over WARMUP_TOKENS, cosine
# decay to MIN_LR (lr/10) over the rest.
TRAIN_SAMPLES=$(( TRAIN_TOKENS / SEQ_LEN ))
WARMUP_SAMPLES=$(( WARMUP_TOKENS / SEQ_LEN ))
MIN_LR=${MIN_LR:-$(awk "BEGIN { print $LR / 10 }")}
SCHEDULE_ARGS=(--seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" --train-samples "$TRAIN_SAMPLES"
               --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-samples "$WARMUP_SAMPLES"
               --lr-decay-samples $(( TRAIN_SAMPLES - WARMUP_SAMPLES )))

# Architecture flags that --echo-preset also implies, spelled out as in Megatron-LM's hybrid examples:
# no position embeddings (Mamba and SKA are position-aware by construction), no linear biases, RMSNorm.
ARCH_ARGS=(--position-embedding-type none --disable-bias-linear --normalization RMSNorm
           --attention-dropout 0.0 --hidden-dropout 0.0 --no-create-attention-mask-in-dataloader)

# Checkpoints (resumed from when present), logging and evaluation.
OUTPUT_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --ckpt-format torch_dist
             --save-interval "${SAVE_INTERVAL:-2000}" --eval-interval "${EVAL_INTERVAL:-2000}" --eval-iters 32
             --log-interval 10 --log-throughput --tensorboard-dir "$TENSORBOARD_DIR")

# Megatron-LM hybrid defaults on GPUs: bf16, distributed optimizer sharded over data-parallel ranks,
# gradient reduce-scatter and parameter all-gather overlapped with compute, AdamW as in
# Megatron-LM's examples/mamba (beta2 0.95, weight decay 0.1, clip 1.0), cosine decay to lr/10.
PERFORMANCE_ARGS=(--bf16 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
OPTIMIZER_ARGS=(--optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
                --lr-decay-style cosine --init-method-std 0.02)

launch() {  # launch FLAGS...: torchrun the Echo launcher with the shared flags, then FLAGS and the script's arguments
    export CUDA_DEVICE_MAX_CONNECTIONS=1  # needed by Megatron's TP/SP communication overlap
    mkdir -p "$RUN_DIR"
    exec torchrun "${DISTRIBUTED_ARGS[@]}" -m echo_megatron.pretrain --echo-preset "$PRESET" "${ARCH_ARGS[@]}" \
        "${LAYOUT_ARGS[@]}" "${SCHEDULE_ARGS[@]}" "${PERFORMANCE_ARGS[@]}" "${OPTIMIZER_ARGS[@]}" "${DATA_ARGS[@]}" \
        "${OUTPUT_ARGS[@]}" "$@"
}
