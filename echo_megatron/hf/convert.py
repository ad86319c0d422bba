"""Megatron-Core tensors <-> Hugging Face tensors and configs, model-free.

Megatron side: the tensor names of Megatron's distributed checkpoints (TE names, fused projections split as
`sharded_state_dict` splits them), e.g. `decoder.layers.0.mixer.in_proj.weight.z` or
`decoder.layers.1.self_attention.in_proj.weight.query`, each a full (TP = 1) tensor. Both a torch_dist
checkpoint (`load_plain_tensors`) and an in-memory model (`megatron_tensors`) give this dict.

Hugging Face side: NemotronH names (`model.embeddings.weight`, `model.layers.{i}.norm.weight`,
`model.layers.{i}.mixer.*`, `model.norm_f.weight`, `lm_head.weight`).

`ArchitectureFields` are the model-defining facts, read from Megatron's stored `args` or from an in-memory
model. `hf_config` picks the target: a stack with softmax `'*'`, a plain (non-gated) MLP and nothing of ours
exports as stock `nemotron_h`; everything else as `echo_hybrid`. Every rule maps both ways, so
Megatron -> HF -> Megatron is bit-identical; a tensor no rule consumes is refused by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor
from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig

from .configuration import EchoHybridConfig

MAMBA_IN_PROJ = ("z", "x", "B", "C", "dt")
MAMBA_CONV = ("x", "B", "C")
SKA_IN_PROJ = ("query", "key", "value")
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
ACTIVATIONS = ("silu", "gelu", "relu2", "relu")
# SKAConfig's ska_* fields: those the HF config carries (same names in EchoHybridConfig), and why each other one
# is not carried. Every SKAConfig field is in exactly one of the two (tests/hf/test_parity_off_defaults.py).
EXPORTED_SKA_FIELDS = ("ska_num_heads", "ska_rank", "ska_value_dim", "ska_chunk_size", "ska_power", "ska_eps",
                       "ska_norm", "ska_power_iters")
UNEXPORTED_SKA_FIELDS = {
    "ska_allow_sequence_max": "the non-causal sequence_max norm is refused (EchoHybridConfig: ska_norm causal only)",
    "ska_zero_init_output": "initialisation only: the output projection is a tensor",
    "ska_eta_init": "initialisation only: η is a tensor per head",
    "ska_backend": "a runtime choice of kernel, not of the function (EchoHybridConfig.ska_backend is the HF one)",
}
ECHO_AUTO_MAP = {"AutoConfig": "configuration_echo_hybrid.EchoHybridConfig",
                 "AutoModelForCausalLM": "modeling_echo_hybrid.EchoHybridForCausalLM"}


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted (the message names the offending content)."""


@dataclass(frozen=True)
class ArchitectureFields:
    """What defines an Echo/Megatron hybrid model, in Megatron's terms (TP-independent)."""

    pattern: str  # Megatron hybrid pattern over 'M', '*', '-'
    attention: str  # "ska" | "softmax" (what '*' holds)
    ffn: str  # "mlp" | "koopman" (what '-' holds)
    hidden_size: int
    vocab_size: int  # rows of the embedding (Megatron's padded vocabulary)
    tied_embeddings: bool
    norm_epsilon: float
    normalization: str
    gated_linear_unit: bool
    activation: str  # ACT2FN name
    ffn_hidden_size: Optional[int]
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    seq_length: int
    mamba_state_dim: int
    mamba_head_dim: int
    mamba_num_groups: int
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding_type: str = "none"
    softmax_scale: Optional[float] = None
    ska: Mapping[str, object] = dataclasses.field(default_factory=dict)  # SKAConfig's ska_* fields
    megatron_vocab_size: Optional[int] = None  # tokenizer vocabulary before padding, if known

    def check_supported(self) -> None:
        """Refuse what NemotronH-style modules cannot hold, naming it."""
        problems = []
        if set(self.pattern) - {"M", "*", "-"}:
            problems.append(f"pattern symbols {sorted(set(self.pattern) - {'M', '*', '-'})} in {self.pattern!r} "
                            "(only 'M', '*', '-' are supported: no MoE 'E', no MTP, no pipeline '|')")
        if self.normalization != "RMSNorm":
            problems.append(f"normalization={self.normalization!r} (NemotronH layers use RMSNorm)")
        if self.add_bias_linear or self.add_qkv_bias:
            problems.append("linear biases (add_bias_linear / add_qkv_bias): NemotronH's linears have none")
        if self.qk_layernorm:
            problems.append("qk_layernorm (NemotronH attention has no query/key norms)")
        if self.position_embedding_type not in ("none", "learned_absolute"):
            problems.append(f"position_embedding_type={self.position_embedding_type!r} (NemotronH has no RoPE)")
        if self.softmax_scale is not None:
            problems.append(f"softmax_scale={self.softmax_scale} (NemotronH scales by head_dim**-0.5)")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} (supported: {ACTIVATIONS})")
        if problems:
            raise ConversionError("cannot convert this model to Hugging Face format: " + "; ".join(problems))

    @property
    def stock_nemotron_h(self) -> bool:
        """Whether stock transformers' NemotronH holds this model exactly."""
        has_attention = "*" in self.pattern
        has_ffn = "-" in self.pattern
        return ((not has_attention or self.attention == "softmax") and (not has_ffn or self.ffn == "mlp")
                and not (has_ffn and self.gated_linear_unit) and self.norm_epsilon == 1e-5)


# ---------------------------------------------------------------------------------------------- configs
def hf_config(fields: ArchitectureFields, tensors: Mapping[str, Tensor], *, dtype: torch.dtype,
              token_ids: Mapping[str, Optional[int]] | None = None):
    """The HF config (`NemotronHConfig` or `EchoHybridConfig`) of a Megatron model; shapes that the stored
    arguments leave implicit (Mamba heads, conv width, Koopman width and gate) are read from the tensors."""
    fields.check_supported()
    mamba = next((i for i, s in enumerate(fields.pattern) if s == "M"), None)
    mamba_heads, conv_kernel = 1, 4
    if mamba is not None:
        mamba_heads = tensors[f"decoder.layers.{mamba}.mixer.A_log"].shape[0]
        conv_kernel = tensors[f"decoder.layers.{mamba}.mixer.conv1d.weight.x"].shape[-1]
    ids = dict(token_ids or {})
    common = dict(
        vocab_size=fields.vocab_size, hidden_size=fields.hidden_size, tie_word_embeddings=False,
        num_attention_heads=fields.num_attention_heads, num_key_value_heads=fields.num_query_groups,
        head_dim=fields.kv_channels, max_position_embeddings=fields.seq_length,
        intermediate_size=fields.ffn_hidden_size or 4 * fields.hidden_size, mlp_hidden_act=fields.activation,
        ssm_state_size=fields.mamba_state_dim, mamba_num_heads=mamba_heads, mamba_head_dim=fields.mamba_head_dim,
        n_groups=fields.mamba_num_groups, conv_kernel=conv_kernel, layer_norm_epsilon=fields.norm_epsilon,
        use_bias=False, mlp_bias=False, attention_bias=False, use_conv_bias=True, chunk_size=128,
        pad_token_id=ids.get("pad_token_id"), bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"), dtype=dtype,
    )
    if fields.stock_nemotron_h:
        # time_step_min is also NemotronH's dt clamp; Megatron never clamps dt (softplus > 0 anyway).
        return NemotronHConfig(layers_block_type=NemotronHConfig._pattern_to_list(fields.pattern), time_step_min=0.0,
                               architectures=["NemotronHForCausalLM"], **common)
    layer_types = EchoHybridConfig.pattern_to_layer_types(fields.pattern)
    if fields.attention == "softmax":
        layer_types = ["full_attention" if t == "ska" else t for t in layer_types]
    ffn_kind = "koopman" if fields.ffn == "koopman" else ("gated_mlp" if fields.gated_linear_unit else "mlp")
    koopman = {}
    first_ffn = fields.pattern.find("-")
    if fields.ffn == "koopman" and first_ffn >= 0:
        prefix = f"decoder.layers.{first_ffn}.mlp"
        koopman = dict(koopman_width=tensors[f"{prefix}.lift.weight"].shape[0],
                       koopman_gate=f"{prefix}.gate.weight" in tensors)
    ska = {name: fields.ska[name] for name in EXPORTED_SKA_FIELDS if name in fields.ska}
    return EchoHybridConfig(layers_block_type=layer_types, ffn_kind=ffn_kind, architectures=["EchoHybridForCausalLM"],
                            auto_map=dict(ECHO_AUTO_MAP), megatron_vocab_size=fields.megatron_vocab_size,
                            **ska, **koopman, **common)


# ---------------------------------------------------------------------------------------------- tensor rules
@dataclass(frozen=True)
class Rule:
    """HF tensors `hf` <-> Megatron tensors `megatron` (both directions, exact)."""

    hf: tuple[str, ...]
    megatron: tuple[str, ...]
    to_hf: Callable[[list[Tensor]], list[Tensor]]
    to_megatron: Callable[[list[Tensor]], list[Tensor]]


def _rename(hf: str, megatron: str) -> Rule:
    return Rule((hf,), (megatron,), list, list)


def _concat(hf: str, megatron: list[str], sizes: list[int]) -> Rule:
    """One HF tensor = Megatron pieces concatenated along axis 0."""
    return Rule((hf,), tuple(megatron), lambda ts: [torch.cat(ts)], lambda ts: list(ts[0].split(sizes)))


def _split(hf: list[str], megatron: str, sizes: list[int]) -> Rule:
    """HF tensors = one Megatron tensor split along axis 0."""
    return Rule(tuple(hf), (megatron,), lambda ts: list(ts[0].split(sizes)), lambda ts: [torch.cat(ts)])


def _qkv_rule(hf_prefix: str, megatron: str, heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron's fused `linear_qkv` [groups·(heads/groups + 2)·head_dim, d], per group [q…; k; v], <-> q/k/v_proj."""
    per_group = heads // groups

    def to_hf(ts):
        fused = ts[0].view(groups, per_group + 2, head_dim, -1)
        q, k, v = fused.split([per_group, 1, 1], dim=1)
        return [x.reshape(-1, fused.shape[-1]) for x in (q, k, v)]

    def to_megatron(ts):
        q, k, v = ts
        hidden = q.shape[-1]
        fused = torch.cat([q.view(groups, per_group, head_dim, hidden), k.view(groups, 1, head_dim, hidden),
                           v.view(groups, 1, head_dim, hidden)], dim=1)
        return [fused.reshape(-1, hidden)]

    return Rule(tuple(f"{hf_prefix}.{n}_proj.weight" for n in "qkv"), (megatron,), to_hf, to_megatron)


def tensor_rules(config) -> list[Rule]:
    """All rules of a model with HF config `config` (NemotronHConfig or EchoHybridConfig)."""
    rules = [_rename("model.embeddings.weight", "embedding.word_embeddings.weight"),
             _rename("model.norm_f.weight", "decoder.final_norm.weight")]
    ffn_kind = getattr(config, "ffn_kind", "mlp")
    for i, layer_type in enumerate(config.layer_types):
        hf, mg = f"model.layers.{i}", f"decoder.layers.{i}"
        if layer_type == "linear_attention":
            inner, bc = config.mamba_num_heads * config.mamba_head_dim, config.n_groups * config.ssm_state_size
            conv = [inner, bc, bc]
            rules += [
                _rename(f"{hf}.norm.weight", f"{mg}.mixer.in_proj.layer_norm_weight"),
                _concat(f"{hf}.mixer.in_proj.weight", [f"{mg}.mixer.in_proj.weight.{n}" for n in MAMBA_IN_PROJ],
                        [inner, inner, bc, bc, config.mamba_num_heads]),
                _concat(f"{hf}.mixer.conv1d.weight", [f"{mg}.mixer.conv1d.weight.{n}" for n in MAMBA_CONV], conv),
                _concat(f"{hf}.mixer.conv1d.bias", [f"{mg}.mixer.conv1d.bias.{n}" for n in MAMBA_CONV], conv),
                *(_rename(f"{hf}.mixer.{n}", f"{mg}.mixer.{n}")
                  for n in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")),
            ]
        elif layer_type == "ska":
            qk, v = config.ska_num_heads * config.ska_rank, config.ska_num_heads * config.ska_value_dim
            rules += [
                _rename(f"{hf}.norm.weight", f"{mg}.self_attention.in_proj.layer_norm_weight"),
                _concat(f"{hf}.mixer.in_proj.weight", [f"{mg}.self_attention.in_proj.weight.{n}" for n in SKA_IN_PROJ],
                        [qk, qk, v]),
                *(_rename(f"{hf}.mixer.{n}", f"{mg}.self_attention.{n}") for n in ("out_proj.weight", "eta", "rho")),
            ]
        elif layer_type == "full_attention":
            rules += [
                _rename(f"{hf}.norm.weight", f"{mg}.self_attention.linear_qkv.layer_norm_weight"),
                _qkv_rule(f"{hf}.mixer", f"{mg}.self_attention.linear_qkv.weight", config.num_attention_heads,
                          config.num_key_value_heads, config.head_dim),
                _rename(f"{hf}.mixer.o_proj.weight", f"{mg}.self_attention.linear_proj.weight"),
            ]
        elif ffn_kind == "koopman":
            rules += [_rename(f"{hf}.norm.weight", f"{mg}.mlp.lift.layer_norm_weight"),
                      *(_rename(f"{hf}.mixer.{n}", f"{mg}.mlp.{n}")
                        for n in ("lift.weight", "readout.weight", "gamma", "omega"))]
            if config.koopman_gate:
                rules.append(_rename(f"{hf}.mixer.gate.weight", f"{mg}.mlp.gate.weight"))
        else:
            rules += [_rename(f"{hf}.norm.weight", f"{mg}.mlp.linear_fc1.layer_norm_weight"),
                      _rename(f"{hf}.mixer.down_proj.weight", f"{mg}.mlp.linear_fc2.weight")]
            if ffn_kind == "gated_mlp":
                width = config.intermediate_size
                rules.append(_split([f"{hf}.mixer.gate_proj.weight", f"{hf}.mixer.up_proj.weight"],
                                    f"{mg}.mlp.linear_fc1.weight", [width, width]))
            else:
                rules.append(_rename(f"{hf}.mixer.up_proj.weight", f"{mg}.mlp.linear_fc1.weight"))
    return rules


def _apply(rules: list[Rule], source: Mapping[str, Tensor], *, forward: bool,
           what: str) -> tuple[dict[str, Tensor], list[str]]:
    """Apply `rules` Megatron -> HF (`forward`) or back: (outputs, names of unused source tensors)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        inputs, outputs = (rule.megatron, rule.hf) if forward else (rule.hf, rule.megatron)
        missing = [name for name in inputs if name not in source]
        if missing:
            raise ConversionError(f"{what} is missing tensor(s) {missing}")
        produced = (rule.to_hf if forward else rule.to_megatron)([source[name] for name in inputs])
        out.update({name: tensor.contiguous() for name, tensor in zip(outputs, produced)})
        used.update(inputs)
    return out, sorted(set(source) - used)


def megatron_to_hf(tensors: Mapping[str, Tensor], config, *, tied_embeddings: bool) -> dict[str, Tensor]:
    """Megatron checkpoint tensors -> HF state dict (lm_head always written: stock NemotronH ignores tying)."""
    out, unused = _apply(tensor_rules(config), tensors, forward=True, what="the Megatron checkpoint")
    unused = [name for name in unused if name != "output_layer.weight"]
    if unused:
        raise ConversionError(f"unsupported content in the Megatron checkpoint (no Hugging Face equivalent): {unused}")
    if tied_embeddings:
        out["lm_head.weight"] = out["model.embeddings.weight"].clone()
    elif "output_layer.weight" in tensors:
        out["lm_head.weight"] = tensors["output_layer.weight"].contiguous()
    else:
        raise ConversionError("the Megatron checkpoint has untied embeddings but no output_layer.weight")
    return out


def hf_to_megatron(state: Mapping[str, Tensor], config, *, tied_embeddings: bool) -> dict[str, Tensor]:
    """HF state dict -> Megatron checkpoint tensors (no `output_layer.weight` when tied)."""
    out, unused = _apply(tensor_rules(config), state, forward=False, what="the Hugging Face checkpoint")
    unused = [name for name in unused if name != "lm_head.weight"]
    if unused:
        raise ConversionError(f"unsupported content in the Hugging Face checkpoint: {unused}")
    if not tied_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"].contiguous()
    return out


def embeddings_tied(state: Mapping[str, Tensor]) -> bool:
    """Whether an exported HF state dict came from a model with tied input/output embeddings."""
    return torch.equal(state["lm_head.weight"], state["model.embeddings.weight"])


__all__ = ["ArchitectureFields", "ConversionError", "EXPORTED_SKA_FIELDS", "UNEXPORTED_SKA_FIELDS", "hf_config", "megatron_to_hf", "hf_to_megatron",
           "tensor_rules", "embeddings_tied", "MODEL_PREFIXES"]
