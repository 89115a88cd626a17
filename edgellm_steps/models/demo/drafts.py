"""Tiny EAGLE3 drafts trained for nothing: the layout of a real draft, fitted to a base checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def make_eagle3_draft(
    output_dir: str | Path,
    base_dir: str | Path,
    *,
    draft_vocab_size: int = 96,
    seed: int = 0,
    std: float = 0.02,
    qkv_bias: bool = False,
    nested_config: bool = False,
) -> Path:
    """Write a random EAGLE3 draft for the tiny base ``base_dir``, in the published layout.

    ``config.json`` as the published drafts carry it (``LlamaForCausalLMEagle3``, one hidden
    layer, the base's vocabulary, ``draft_vocab_size``, ``target_hidden_size``) and
    ``model.safetensors`` with ``midlayer.*`` (q/k/v/o, gate/up/down, ``input_layernorm``,
    ``hidden_norm``, ``post_attention_layernorm``), ``fc`` [H, 3H], ``norm``, ``lm_head``
    [draft vocab, H], ``d2t`` (int64 offsets, base id = draft id + d2t) and ``t2d`` (bool over
    the base vocabulary). ``qkv_bias`` gives Qwen-style q/k/v biases. ``nested_config`` writes every
    key but ``architectures`` and ``model_type`` under ``text_config``, as drafts trained for a VLM do.
    """
    import json

    import torch
    from safetensors.torch import save_file

    base = json.loads((Path(base_dir) / "config.json").read_text())
    text = base.get("text_config", base)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    vocab = text["vocab_size"]
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch.float16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(hidden, generator=generator)).to(torch.float16)

    inter = 2 * hidden
    tensors = {
        "fc.weight": normal(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": normal(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": normal(inter, hidden),
        "midlayer.mlp.up_proj.weight": normal(inter, hidden),
        "midlayer.mlp.down_proj.weight": normal(hidden, inter),
        "norm.weight": norm(),
        "lm_head.weight": normal(draft_vocab_size, hidden),
    }
    if qkv_bias:
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            tensors[f"midlayer.self_attn.{name}_proj.bias"] = normal(rows)
    base_ids = torch.sort(torch.randperm(vocab, generator=generator)[:draft_vocab_size]).values
    tensors["d2t"] = base_ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[base_ids] = True
    tensors["t2d"] = t2d
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)}
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": text["max_position_embeddings"],
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None,
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab_size,
        "target_hidden_size": hidden,
        "torch_dtype": "float16",
    }
    if nested_config:
        top = ("architectures", "model_type")
        config = {**{k: config[k] for k in top}, "text_config": {k: v for k, v in config.items() if k not in top}}
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("wrote a tiny EAGLE3 draft (draft vocabulary %d) to %s", draft_vocab_size, output_dir)
    return output_dir
