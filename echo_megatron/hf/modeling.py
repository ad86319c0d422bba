"""`EchoHybridForCausalLM`: a transformers 5 model for Echo hybrid stacks, built from NemotronH's own modules.

Layout and names follow NemotronH (`model.embeddings`, `model.layers.{i}.norm`, `model.layers.{i}.mixer.*`,
`model.norm_f`, `lm_head`). Mixers by layer type:

| layer type         | mixer                                                          | cache                        |
|--------------------|----------------------------------------------------------------|------------------------------|
| `linear_attention` | `NemotronHMamba2Mixer` (dt clamp and gated-norm eps as Megatron) | transformers' `LinearAttentionLayer` |
| `full_attention`   | `NemotronHAttention` (softmax, GQA, no RoPE)                   | `DynamicLayer` (grows)       |
| `ska`              | `EchoSKAMixer`: in_proj [q; k; v], SKA (`echo_megatron.ops`), out_proj | `SKACacheLayer` (constant) |
| `mlp`              | `NemotronHMLP`, `EchoGatedMLP` or `EchoKoopmanMLP` (`config.ffn_kind`) | none                |

Every block is `x + mixer(RMSNorm(x))`, as in Megatron's hybrid stack.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.nemotron_h.modeling_nemotron_h import (
    NemotronHAttention,
    NemotronHForCausalLM,
    NemotronHMamba2Mixer,
    NemotronHMLP,
    NemotronHPreTrainedModel,
    NemotronHRMSNorm,
)

from echo_megatron.ops import ska

from .cache import SKACacheLayer, ska_left_padded
from .configuration import EchoHybridConfig

ETA_INIT = 1.5
RHO_INIT = -4.0
OMEGA_INIT_STD = 0.1


class EchoSKAMixer(nn.Module):
    """Spectral Koopman Attention: hidden_states [B, T, d] -> [B, T, d] (SPEC §5).

    `in_proj` rows are [q of all heads | k of all heads | v of all heads] (H·r, H·r, H·P); `eta` (η) and `rho`
    (ρ, γ̂ = 1 + 0.5·sigmoid(ρ)) are per head [H].
    """

    def __init__(self, config: EchoHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.rank, self.value_dim = config.ska_num_heads, config.ska_rank, config.ska_value_dim
        self.split_sizes = (self.num_heads * self.rank, self.num_heads * self.rank, self.num_heads * self.value_dim)
        self.in_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=False)
        self.out_proj = nn.Linear(self.num_heads * self.value_dim, config.hidden_size, bias=False)
        self.eta = nn.Parameter(torch.full((self.num_heads,), ETA_INIT))
        self.rho = nn.Parameter(torch.full((self.num_heads,), RHO_INIT))
        self.options = dict(chunk_size=config.ska_chunk_size, power=config.ska_power, eps=config.ska_eps,
                            norm=config.ska_norm, power_iters=config.ska_power_iters)
        self.backend = config.ska_backend

    def gamma(self) -> Tensor:
        """γ̂ = 1 + 0.5·sigmoid(ρ) per head [H], in at least fp32."""
        return 1.0 + 0.5 * torch.sigmoid(self.rho.to(torch.promote_types(self.rho.dtype, torch.float32)))

    def extra_repr(self) -> str:
        """Head shapes and which SKA runs: `echo_megatron.ops.ska` or the exported file's own PyTorch path."""
        return (f"heads={self.num_heads}, rank={self.rank}, value_dim={self.value_dim}, backend={self.backend}, "
                f"ska={ska.__module__}.{ska.__name__}")

    def forward(self, hidden_states: Tensor, cache_layer: SKACacheLayer | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        """hidden_states [B, T, d]; padding_mask [B, T] (left padding) or None -> [B, T, d]."""
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self.in_proj(hidden_states).split(self.split_sizes, dim=-1)
        q = q.reshape(batch, seq_len, self.num_heads, self.rank)
        k = k.reshape(batch, seq_len, self.num_heads, self.rank)
        v = v.reshape(batch, seq_len, self.num_heads, self.value_dim)
        if cache_layer is None:
            y = ska_left_padded(q, k, v, padding_mask, eta=self.eta, gamma=self.gamma(), backend=self.backend,
                                **self.options)
        else:
            y = cache_layer.forward(q, k, v, padding_mask, eta=self.eta, gamma=self.gamma(), options=self.options)
        return self.out_proj(y.reshape(batch, seq_len, self.num_heads * self.value_dim))


class EchoGatedMLP(nn.Module):
    """Gated MLP (SwiGLU with `mlp_hidden_act="silu"`): down(act(gate(x)) ⊙ up(x)), Megatron's GLU order."""

    def __init__(self, config: EchoHybridConfig, layer_idx: int | None = None):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.mlp_hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class EchoKoopmanMLP(nn.Module):
    """Spectral Koopman MLP (SPEC §7): readout(λ̂ ⊙ SiLU(lift x) [⊙ sigmoid(gate x)]), pairs as complex numbers.

    λ_i = γ_i − i·ω_i rescaled to |λ̂_i| ≤ 1; `gamma`, `omega`: [d_k / 2].
    """

    def __init__(self, config: EchoHybridConfig, layer_idx: int | None = None):
        super().__init__()
        width = config.koopman_width
        self.lift = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.gate = nn.Linear(config.hidden_size, width, bias=config.mlp_bias) if config.koopman_gate else None
        self.readout = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.gamma = nn.Parameter(torch.ones(width // 2))
        self.omega = nn.Parameter(torch.zeros(width // 2))

    def forward(self, x: Tensor) -> Tensor:
        g_re, g_im = nn.functional.silu(self.lift(x)).unflatten(-1, (-1, 2)).unbind(-1)
        dtype = torch.promote_types(self.gamma.dtype, torch.float32)
        gamma, omega = self.gamma.to(dtype), self.omega.to(dtype)
        modulus = torch.hypot(gamma, omega).clamp_min(1.0)  # |λ̂| <= 1
        lam_re, lam_im_neg = (gamma / modulus).to(g_re.dtype), (omega / modulus).to(g_re.dtype)
        z = torch.stack((lam_re * g_re + lam_im_neg * g_im, lam_re * g_im - lam_im_neg * g_re), dim=-1).flatten(-2)
        if self.gate is not None:
            z = z * torch.sigmoid(self.gate(x))
        return self.readout(z)


FFN_TYPES = {"mlp": NemotronHMLP, "gated_mlp": EchoGatedMLP, "koopman": EchoKoopmanMLP}


def _mamba_mixer(config: EchoHybridConfig, layer_idx: int) -> NemotronHMamba2Mixer:
    """NemotronH's Mamba-2 mixer with Megatron's dt clamp (`time_step_limit`) and gated-norm eps."""
    mixer = NemotronHMamba2Mixer(config, layer_idx=layer_idx)
    mixer.time_step_limit = tuple(config.time_step_limit)
    mixer.norm.variance_epsilon = config.mamba_norm_epsilon
    return mixer


class EchoHybridBlock(GradientCheckpointingLayer):
    """x + mixer(RMSNorm(x)) with the mixer of `config.layer_types[layer_idx]`."""

    def __init__(self, config: EchoHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.block_type = config.layer_types[layer_idx]
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        if self.block_type == "linear_attention":
            self.mixer = _mamba_mixer(config, layer_idx)
        elif self.block_type == "full_attention":
            self.mixer = NemotronHAttention(config, layer_idx=layer_idx)
        elif self.block_type == "ska":
            self.mixer = EchoSKAMixer(config, layer_idx)
        else:
            self.mixer = FFN_TYPES[config.ffn_kind](config, layer_idx=layer_idx)

    def forward(self, hidden_states: Tensor, past_key_values=None, attention_mask=None, position_ids=None,
                use_cache: bool | None = False, **kwargs) -> Tensor:
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.block_type == "linear_attention":
            hidden_states = self.mixer(hidden_states, cache_params=past_key_values, attention_mask=attention_mask)
        elif self.block_type == "full_attention":
            hidden_states, _ = self.mixer(hidden_states=hidden_states, past_key_values=past_key_values,
                                          attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        elif self.block_type == "ska":
            hidden_states = self.mixer(hidden_states, cache_layer=self._ska_cache(past_key_values),
                                       padding_mask=attention_mask)
        else:
            hidden_states = self.mixer(hidden_states)
        return residual + hidden_states

    def _ska_cache(self, past_key_values) -> SKACacheLayer | None:
        """This layer's SKA cache. Checked by `_layer_type`, not class: transformers builds the cache from the
        last class registered for "ska", which is an exported file's copy when one is loaded in this process."""
        if past_key_values is None:
            return None
        layer = past_key_values.layers[self.layer_idx] if self.layer_idx < len(past_key_values.layers) else None
        if getattr(layer, "_layer_type", None) != SKACacheLayer._layer_type:
            raise TypeError(f"layer {self.layer_idx} is an SKA layer but the cache holds {type(layer).__name__} there: "
                            "create the cache with DynamicCache(config=model.config)")
        return layer


class EchoHybridPreTrainedModel(NemotronHPreTrainedModel):
    config_class = EchoHybridConfig
    config: EchoHybridConfig
    _no_split_modules = ["EchoHybridBlock"]
    _can_record_outputs = {"hidden_states": EchoHybridBlock, "attentions": NemotronHAttention}
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        """NemotronH's initialisation, plus η = 1.5, ρ = −4 for SKA and γ = 1, ω ~ N(0, 0.1²) for the Koopman MLP."""
        super()._init_weights(module)
        if isinstance(module, EchoSKAMixer):
            init.constant_(module.eta, ETA_INIT)
            init.constant_(module.rho, RHO_INIT)
        elif isinstance(module, EchoKoopmanMLP):
            init.ones_(module.gamma)
            init.normal_(module.omega, mean=0.0, std=OMEGA_INIT_STD)


class EchoHybridModel(EchoHybridPreTrainedModel):
    """Embeddings, blocks, final RMSNorm: input_ids [B, T] -> last_hidden_state [B, T, d]."""

    def __init__(self, config: EchoHybridConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([EchoHybridBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, attention_mask=None, **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        masks = attention_mask if isinstance(attention_mask, dict) else self.create_masks(
            self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = inputs_embeds
        for block in self.layers:
            hidden_states = block(hidden_states, past_key_values=past_key_values,
                                  attention_mask=masks.get(block.block_type), position_ids=position_ids,
                                  use_cache=use_cache, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.norm_f(hidden_states),
                                       past_key_values=past_key_values if use_cache else None)

    @staticmethod
    def create_masks(config, inputs_embeds, attention_mask, past_key_values, position_ids=None) -> dict:
        """Masks per layer type: softmax layers get a causal (4-D or None) mask, Mamba and SKA layers the 2-D
        padding mask of the current tokens (None without padding)."""
        mask_kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, position_ids=position_ids)
        recurrent = create_recurrent_attention_mask(**mask_kwargs)
        masks = {"linear_attention": recurrent, "ska": recurrent}
        if "full_attention" in config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        return masks


class EchoHybridForCausalLM(EchoHybridPreTrainedModel, GenerationMixin):
    """Echo hybrid language model: `EchoHybridModel` + `lm_head` (NemotronH's forward and loss)."""

    _tied_weights_keys = {}

    def __init__(self, config: EchoHybridConfig):
        super().__init__(config)
        self.model = EchoHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    forward = NemotronHForCausalLM.forward

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        kwargs["logits_to_keep"] = self.config.num_logits_to_keep
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, past_key_values, position_ids=None, **_):
        return EchoHybridModel.create_masks(config.get_text_config(), inputs_embeds, attention_mask, past_key_values,
                                            position_ids)


__all__ = ["EchoHybridPreTrainedModel", "EchoHybridModel", "EchoHybridForCausalLM", "EchoSKAMixer",
           "EchoGatedMLP", "EchoKoopmanMLP"]
