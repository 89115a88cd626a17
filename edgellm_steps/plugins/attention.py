"""``trt::AttentionPlugin``: RoPE, KV-cache write and causal GQA attention in one op.

Semantics (contract section 3.4): Q/K/V arrive packed and pre-RoPE. For each
sequence b the new tokens sit at positions ``start_b .. start_b + S - 1`` where
``start_b = kvcache_start_index[b]`` (0 when that input is empty, i.e. a plain
prefill); only the first ``context_lengths[b] - start_b`` of them are real, the
rest is batch padding. RoPE uses row ``position`` of the runtime's cos|sin table
(cos half, then sin half; rotate-half convention over the first ``rot`` dims);
K and V are written into the full-capacity cache at those positions; each token
attends causally to cache positions ``0 .. its position`` with scale 1/sqrt(D);
query head h reads KV head ``h // (Hq / Hkv)``.

Tree attention (EAGLE graphs): when ``attention_pos_id`` has one entry per new token,
those S tokens are slots of a speculation tree. Their K/V still go to cache positions
``start .. start + S - 1``, RoPE rotates token s at ``attention_pos_id[b, s]``, every
cache position before ``start`` is visible to all of them, and slot j is visible to
token s when bit j % 32 of word j // 32 of ``attention_mask[b, s]`` is set. A prefill
passes placeholder tree inputs of one entry and attends causally.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from edgellm_steps.graph.onnx_builder import PLUGIN_DOMAIN, GraphBuilder
from edgellm_steps.quant.formats import FP8_E4M3_MAX

OP_TYPE = "AttentionPlugin"


def emit_attention_plugin(
    builder: GraphBuilder,
    name: str,
    *,
    qkv: str,
    past_key_value: str,
    context_lengths: str,
    rope_rotary_cos_sin: str,
    kvcache_start_index: str,
    present_key_value: str,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    kv_scales: tuple[float, float] | None = None,
    tree: tuple[str, str] | None = None,
) -> str:
    """Add one attention node; returns the name of its ``attn_output`` [B,S,Hq,D].

    ``kv_scales`` ([k_amax/448, v_amax/448]) makes the cache fp8 and becomes the
    constant ``k_v_scale_quant_orig`` input. ``tree`` (the ``attention_mask`` and
    ``attention_pos_id`` inputs, EAGLE graphs) enables tree attention.
    """
    inputs = [qkv, past_key_value, context_lengths, rope_rotary_cos_sin, kvcache_start_index]
    if tree is not None:
        inputs += list(tree)
    if kv_scales is not None:
        inputs.append(builder.constant(np.array(kv_scales, dtype=np.float32), "k_v_scale_quant_orig"))
    attn_output, _ = builder.node(
        OP_TYPE,
        inputs,
        name,
        outputs=[f"{name}_attn_output", present_key_value],
        domain=PLUGIN_DOMAIN,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        enable_tree_attention=int(tree is not None),
        enable_fp8_kv_cache=int(kv_scales is not None),
    )
    return attn_output


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on the first ``2 * cos.shape[-1]`` dims of ``x`` [n, heads, D]."""
    half = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def attention_reference(
    qkv: np.ndarray,
    past_key_value: np.ndarray,
    context_lengths: np.ndarray,
    rope_rotary_cos_sin: np.ndarray,
    kvcache_start_index: np.ndarray,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    kv_scales: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    attention_pos_id: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """NumPy implementation of the plugin; returns (attn_output, present_key_value).

    With ``kv_scales`` the cache holds fp8 codes: K and V are divided by their
    scale when written and multiplied by it when read. With ``attention_mask`` and
    ``attention_pos_id`` covering the new tokens, they attend as a tree (module docstring).
    """
    batch, seq, _ = qkv.shape
    hq, hkv, d = num_q_heads, num_kv_heads, head_size
    capacity = past_key_value.shape[3]
    x = qkv.astype(np.float32)
    q = x[..., : hq * d].reshape(batch, seq, hq, d)
    k = x[..., hq * d : (hq + hkv) * d].reshape(batch, seq, hkv, d)
    v = x[..., (hq + hkv) * d :].reshape(batch, seq, hkv, d)
    present = past_key_value.copy()
    scale = np.ones(2, np.float32) if kv_scales is None else np.asarray(kv_scales, np.float32)

    def store(values: np.ndarray, which: int) -> np.ndarray:
        if kv_scales is None:
            return values.astype(present.dtype)
        return np.clip(values / scale[which], -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(present.dtype)

    def load(which: int, total: int) -> np.ndarray:
        return present[b, which, :, :total].astype(np.float32) * scale[which]

    out = np.zeros((batch, seq, hq, d), dtype=qkv.dtype)
    half = rope_rotary_cos_sin.shape[-1] // 2
    tree = attention_pos_id is not None and attention_pos_id.shape[1] == seq and seq > 1
    for b in range(batch):
        start = int(kvcache_start_index[b]) if kvcache_start_index.size else 0
        n = min(max(int(context_lengths[b]) - start, 0), seq)
        if start + n > capacity:
            raise ValueError(f"sequence {b} needs {start + n} cache slots but the cache holds {capacity}")
        slots = start + np.arange(n)
        positions = attention_pos_id[b, :n].astype(np.int64) if tree else slots
        table = rope_rotary_cos_sin[b if rope_rotary_cos_sin.shape[0] > 1 else 0][positions]
        cos, sin = table[:, :half], table[:, half:]
        qb = _apply_rope(q[b, :n], cos, sin)
        kb = _apply_rope(k[b, :n], cos, sin)
        present[b, 0, :, start : start + n] = store(kb.transpose(1, 0, 2), 0)
        present[b, 1, :, start : start + n] = store(v[b, :n].transpose(1, 0, 2), 1)
        total = start + n
        keys = np.repeat(load(0, total), hq // hkv, axis=0)
        values = np.repeat(load(1, total), hq // hkv, axis=0)
        scores = np.einsum("shd,htd->hst", qb, keys) / np.sqrt(d)
        if tree:
            words = attention_mask[b, :n].astype(np.int64) & 0xFFFFFFFF
            bits = (words[:, np.arange(n) // 32] >> (np.arange(n) % 32)) & 1
            visible = np.concatenate([np.ones((n, start), bool), bits.astype(bool)], axis=1)
        else:
            visible = np.arange(total)[None, :] <= slots[:, None]
        scores = np.where(visible[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[b, :n] = np.einsum("hst,htd->shd", probs, values).astype(qkv.dtype)
    return out, present


class AttentionPluginOp(OpRun):
    """``onnx.reference`` binding of :func:`attention_reference`."""

    op_domain = PLUGIN_DOMAIN

    def _run(
        self,
        qkv,
        past_key_value,
        context_lengths,
        rope_rotary_cos_sin,
        kvcache_start_index,
        *extra,
        num_q_heads=None,
        num_kv_heads=None,
        head_size=None,
        enable_tree_attention=None,
        enable_fp8_kv_cache=None,
    ):
        tree, extra = (extra[:2], extra[2:]) if enable_tree_attention else ((None, None), extra)
        if bool(enable_fp8_kv_cache) != bool(extra):
            raise ValueError("enable_fp8_kv_cache and the k_v_scale_quant_orig input go together")
        return attention_reference(
            qkv,
            past_key_value,
            context_lengths,
            rope_rotary_cos_sin,
            kvcache_start_index,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            kv_scales=extra[0] if extra else None,
            attention_mask=tree[0],
            attention_pos_id=tree[1],
        )


# onnx.reference looks custom ops up by class name.
AttentionPluginOp.__name__ = OP_TYPE
