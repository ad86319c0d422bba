"""Data and forward step of the launcher: Megatron's GPT datasets, language-model loss.

The thin equivalent of Megatron-LM's `pretrain_hybrid.py` data path (not shipped in the
megatron-core wheel): `GPTDataset` over indexed `.bin/.idx` files (`--data-path` blends,
`--split`, per-split paths) or `MockGPTDataset` (`--mock-data`), tokenizer from Megatron's
`build_tokenizer` (`--tokenizer-type`). Every rank builds its own data iterator, so tensor- and
pipeline-parallel ranks of one data-parallel replica read the same samples without a broadcast.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.training import get_args, get_timers, get_tokenizer
from megatron.training.utils import get_blend_and_blend_per_split, print_rank_0


DATA_PATH_FLAGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")


def check_data_files(args) -> None:
    """Every dataset prefix of the --data-path flags (blends: "weight prefix ...") has its `.idx` and `.bin`,
    and the `.bin` holds exactly the bytes its `.idx` indexes; else ValueError naming the file (Megatron would
    fail only after initialising, or read another file's tokens)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    prefixes = []
    for flag in DATA_PATH_FLAGS:
        for value in getattr(args, flag, None) or []:
            try:
                float(value)  # a blend weight
            except ValueError:
                prefixes.append(value)
    for prefix in prefixes:
        idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx, bin_):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (dataset prefix {prefix!r}; write it with "
                                 "`echo-megatron preprocess`)")
        try:
            index = _IndexReader(idx, multimodal=False)
        except Exception as error:
            raise ValueError(f"{idx}: unreadable index ({type(error).__name__}: {error})") from error
        count = len(index.sequence_lengths)
        expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if count else 0
        if os.path.getsize(bin_) != expected:
            raise ValueError(f"{bin_}: {os.path.getsize(bin_)} bytes, but {idx} indexes {expected} ({count} sequences "
                             f"of {index.dtype.__name__}): the .idx was not written with this .bin")


def gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    """`GPTDatasetConfig` from Megatron-LM's data flags (as `pretrain_gpt.py` builds it)."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # SKA and causal softmax attention build no [s, s] mask
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's dataset provider: (train, valid, test) GPT datasets of the requested sizes."""
    args = get_args()
    config = gpt_dataset_config_from_args(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {dataset_type.__name__} train, validation and test datasets ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, lambda: True, config
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True  # every rank builds its data iterator


def get_batch(data_iterator) -> dict[str, Tensor]:
    """Next micro-batch {tokens, labels, loss_mask, position_ids} [b, s] on this rank's device,
    split over context-parallel ranks."""
    batch = next(data_iterator)
    device = torch.cuda.current_device()
    batch = {key: batch[key].to(device, non_blocking=True) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=parallel_state.get_context_parallel_group())
    return batch


def loss_func(loss_mask: Tensor, output_tensor: Tensor):
    """Summed token loss, token count and the 'lm loss' report (Megatron divides by the count)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron's forward step: per-token losses of one micro-batch and the loss function."""
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])
