"""A mask-aware LLaMA-layout decoder (LLaMA, Mistral, Qwen2) with Hugging Face parameter names.

Legend: B batch, T sequence, D hidden, H query heads, G key/value heads, K head_dim, F MLP width,
L layers, V vocabulary.

The module tree and parameter names are those of ``transformers.LlamaForCausalLM``
(``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.down_proj``,
``model.norm``, ``lm_head``), so an HF checkpoint loads strictly and a state dict minus the masks *is*
an HF state dict. Rotary embeddings (every ``rope_scaling`` type) come from ``transformers`` itself.
The family (``shearing.models.family``, from ``config.model_type``) decides which projections carry
biases (Qwen2: ``self_attn.{q,k,v}_proj.bias``); everything else is the same layout.

``hidden_states(input_ids, masks)`` is the final norm's output [B, T, D]; ``forward`` is the LM head over
it (a caller can apply the head chunk by chunk, e.g. for distillation).

Masks are an optional ``Masks`` value (or an L0 family dict, resolved by ``Masks.from_families``) given
to ``forward`` (SPEC §1); with none given this computes exactly what HF's model computes. Where they
multiply:

- embeddings output × hidden_z;
- attention: per-head context × head_z (× the head's kv_group_z) before ``o_proj``;
  ``o_proj`` output × (layer_z or head_layer_z) × hidden_z;
- MLP: ``act(gate_proj(x)) * up_proj(x)`` × intermediate_z before ``down_proj``;
  ``down_proj`` output × (layer_z or mlp_z) × hidden_z;
- RMSNorm under a hidden mask: the mean of squares is over the channels with hidden_z != 0 only
  (as the physically smaller model computes it), then × weight × hidden_z;
- the LM head reads the masked final norm output (hidden_z applied once).

Attention is PyTorch SDPA (causal, GQA-native) by default, flash-attn 2 when asked for. Inputs are
packed full-length sequences: there is no padding mask. There is no sliding window: a config with one
(Mistral, Qwen2) is accepted by run validation only up to ``sliding_window`` tokens, where the window
changes nothing (``family.check_sliding_window``), and ``hidden_states`` refuses a longer sequence on any
other path rather than compute what the stock model does not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shearing.models.family import family_of, window_in_effect
from shearing.models.masks import Masks

ATTN_IMPLS = ("sdpa", "flash", "eager")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class MaskedRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, hidden_z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        if hidden_z is None:
            variance = x32.pow(2).mean(-1, keepdim=True)
        else:
            alive = (hidden_z != 0).to(torch.float32)
            variance = (x32.pow(2) * alive).sum(-1, keepdim=True) / alive.sum().clamp_min(1.0)
        out = self.weight * (x32 * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)
        return out if hidden_z is None else out * hidden_z.to(out.dtype)


class MaskedAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_impl: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attn_impl = attn_impl
        d, hk, gk = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        family = family_of(config)
        self.q_proj = nn.Linear(d, hk, bias=family.projection_bias("q_proj"))
        self.k_proj = nn.Linear(d, gk, bias=family.projection_bias("k_proj"))
        self.v_proj = nn.Linear(d, gk, bias=family.projection_bias("v_proj"))
        self.o_proj = nn.Linear(hk, d, bias=family.projection_bias("o_proj"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_z: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # B H T K
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # B G T K
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # Under autocast RoPE runs in fp32 (cos/sin follow the fp32 residual stream) while v is bf16; cast
        # q, k back to v's dtype, as SDPA's autocast does, because flash-attn takes only fp16/bf16.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.attn_impl == "flash":
            from flash_attn import flash_attn_func

            ctx = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            ctx = ctx.transpose(1, 2)  # B H T K
        elif self.attn_impl == "eager":
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            ctx = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads
            )
        if head_z is not None:
            ctx = ctx * head_z.to(ctx.dtype)[None, :, None, None]
        return self.o_proj(ctx.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MaskedMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, intermediate_z: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if intermediate_z is not None:
            h = h * intermediate_z.to(h.dtype)
        return self.down_proj(h)


def _scale(x: torch.Tensor, *gates: torch.Tensor | None) -> torch.Tensor:
    for gate in gates:
        if gate is not None:
            x = x * gate.to(x.dtype)
    return x


class MaskedDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_impl: str):
        super().__init__()
        self.self_attn = MaskedAttention(config, attn_impl)
        self.mlp = MaskedMLP(config)
        self.input_layernorm = MaskedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MaskedRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        hidden_z: torch.Tensor | None = None,
        head_z: torch.Tensor | None = None,
        intermediate_z: torch.Tensor | None = None,
        attn_z: torch.Tensor | None = None,
        mlp_z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x, hidden_z), cos, sin, head_z)
        x = x + _scale(attn, attn_z, hidden_z)
        mlp = self.mlp(self.post_attention_layernorm(x, hidden_z), intermediate_z)
        return x + _scale(mlp, mlp_z, hidden_z)


class MaskedLlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_impl: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MaskedDecoderLayer(config, attn_impl) for _ in range(config.num_hidden_layers)
        )
        self.norm = MaskedRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)


class MaskedLlamaForCausalLM(nn.Module):
    """``LlamaForCausalLM`` with optional structured masks (see the module docstring)."""

    def __init__(self, config: PretrainedConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"model.attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if attn_impl == "flash" and not flash_attn_available():
            raise ValueError(
                "model.attn_impl=flash needs flash-attn and a CUDA device: install the [gpu] extra "
                "(pip install -e '.[gpu]') or use attn_impl: sdpa"
            )
        self.config = config
        self.window = window_in_effect(config)  # Mistral/Qwen2: the window some layer applies (family.py)
        self.model = MaskedLlamaModel(config, attn_impl)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # Composer reads these off the model it wraps: one FSDP unit and one checkpointed block per layer.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, MaskedDecoderLayer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return isinstance(module, MaskedDecoderLayer)

    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, masks: Masks | Mapping[str, torch.Tensor] | None = None):
        """The final norm's output [B, T, D] under ``masks`` (hidden_z applied once): what the LM head
        reads. ``masks`` is a ``Masks`` or an L0 family dict (``Masks.from_families``)."""
        if self.window is not None and input_ids.shape[1] > self.window:
            raise ValueError(
                f"a {input_ids.shape[1]}-token sequence is longer than this model's sliding_window="
                f"{self.window}: the stock model would attend within that window and this one has none; "
                f"use sequences of at most {self.window} tokens"
            )
        masks = Masks.coerce(masks, self.config.num_attention_heads // self.config.num_key_value_heads)
        x = _scale(self.model.embed_tokens(input_ids), masks.hidden)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.model.rotary_emb(x, positions)
        for i, layer in enumerate(self.model.layers):
            args = (x, cos, sin, masks.hidden, *masks.layer(i))
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.model.norm(x, masks.hidden)

    def forward(
        self, input_ids: torch.Tensor, masks: Masks | Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V]: the LM head over ``hidden_states``."""
        return self.lm_head(self.hidden_states(input_ids, masks))
