"""The EAGLE3 draft as a torch module, built from the published checkpoint layout.

transformers has no EAGLE3 draft class, so the verify step's reference and quantize-draft's
calibration model is this module: ``nn.Linear`` layers named as the
checkpoint names them (``fc``, ``midlayer.self_attn.q_proj``, ..., ``lm_head``), so
ModelOpt finds and quantizes them like any model's. The computation is the draft's:
h = fc(base hidden states) + the draft's previous hidden state; one decoder layer whose
attention reads concat(input_layernorm(embeds), hidden_norm(h)) and whose residual starts
from h; the final norm, ``lm_head`` over the draft vocabulary, log-softmax.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgellm_steps.artifacts.checkpoint import DecoderDims, decoder_dims, draft_widths


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DraftAttention(nn.Module):
    """The midlayer's causal self-attention over positions 0..S-1 (GQA, rotary on the whole head).

    :meth:`cache_kv` marks where the runtime writes K (rotated) and V to the KV cache; it
    passes them through here, and quantize-draft's ModelOpt subclass quantizes them there
    (``k_bmm_quantizer`` / ``v_bmm_quantizer``, as ModelOpt names the KV quantizers of HF models).
    """

    def __init__(self, dims: DecoderDims, in_width: int, *, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.rope_theta = dims.rope_theta
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = nn.Linear(in_width, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(in_width, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(in_width, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, dims.hidden_size, bias=False)

    def cache_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / self.head_dim)
        angles = (positions.double()[:, None] * inv_freq).float()
        cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)  # [S, 1, half]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        positions = torch.arange(seq)
        q = self._rotate(self.q_proj(x).view(batch, seq, self.heads, self.head_dim), positions)
        k = self._rotate(self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim), positions)
        k, v = self.cache_kv(k, self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim))
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bshd,bthd->bhst", q, k) / self.head_dim**0.5
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        out = torch.einsum("bhst,bthd->bshd", probs, v).reshape(batch, seq, self.heads * self.head_dim)
        return self.o_proj(out)


class Eagle3Draft(nn.Module):
    """One EAGLE3 draft; :meth:`forward` runs S new tokens of a fresh sequence (positions 0..S-1), causally."""

    def __init__(self, config: dict[str, Any], *, qkv_bias: bool) -> None:
        super().__init__()
        dims = decoder_dims(config)
        width, (target, draft_vocab) = dims.hidden_size, draft_widths(config)
        self.fc = nn.Linear(3 * target, width, bias=False)
        self.midlayer = nn.Module()
        layer = self.midlayer
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            setattr(layer, name, RMSNorm(width, dims.rms_norm_eps))
        layer.self_attn = DraftAttention(dims, 2 * width, qkv_bias=qkv_bias)
        layer.mlp = nn.Module()
        layer.mlp.gate_proj = nn.Linear(width, dims.intermediate_size, bias=False)
        layer.mlp.up_proj = nn.Linear(width, dims.intermediate_size, bias=False)
        layer.mlp.down_proj = nn.Linear(dims.intermediate_size, width, bias=False)
        self.norm = RMSNorm(width, dims.rms_norm_eps)
        self.lm_head = nn.Linear(width, draft_vocab, bias=False)

    @classmethod
    def from_store(cls, config: dict[str, Any], store: Any) -> Eagle3Draft:
        """The draft holding the checkpoint's tensors (float32); ``d2t``, ``t2d`` and ``embed_tokens`` are not its."""
        model = cls(config, qkv_bias="midlayer.self_attn.q_proj.bias" in store)
        state = {name: store.get(name).float() for name in model.state_dict()}
        model.load_state_dict(state)
        return model.eval()

    def forward(
        self, embeds: torch.Tensor, hidden_in: torch.Tensor, from_draft: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [B, S, draft vocab], pre-norm hidden states [B, S, H]) for inputs [B, S, *]."""
        layer = self.midlayer
        h = self.fc(hidden_in) + from_draft
        both = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(h)], dim=-1)
        x = h + layer.self_attn(both)
        post = layer.post_attention_layernorm(x)
        x = x + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(post)) * layer.mlp.up_proj(post))
        return self.lm_head(self.norm(x)).log_softmax(-1), x
