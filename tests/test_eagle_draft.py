"""export-draft (contract 5): the EAGLE3 draft graph against a torch forward written from the checkpoint layout.

The reference below is written here, from the published draft layout and the EAGLE3 draft
computation (fc of the base's three hidden states plus the draft's own, one decoder layer
over concat(norm(embeds), norm(h)), residual from h, final norm, lm_head, log-softmax); it
shares no code with the graph builder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from edgellm_steps.errors import SourceError
from edgellm_steps.export import llm_io
from edgellm_steps.export.export_draft import export_draft
from edgellm_steps.models.demo import make_eagle3_draft
from edgellm_steps.plugins import REFERENCE_OPS
from edgellm_steps.verify.parity import TOLERANCES, compare_logits

#: Base families and draft styles: a Llama-style draft, a Qwen-style one (q/k/v biases), and a draft
#: for a VLM base (Qwen2.5-VL: the base's dims under text_config) whose own config nests them too.
CASES = {
    "llama": ("llama", False, False),
    "qwen2-bias": ("qwen2", True, False),
    "vlm-nested": ("qwen2_5_vl", False, True),
}
SEQ = 7


@pytest.fixture(scope="module", params=sorted(CASES))
def draft(request, checkpoint_factory, tmp_path_factory):
    family, bias, nested = CASES[request.param]
    base = checkpoint_factory(family)
    root = tmp_path_factory.mktemp(f"draft-{request.param}")
    # std 0.2: attention that depends on position and content, so a wrong mask or rotation shows.
    checkpoint = make_eagle3_draft(root / "draft", base, std=0.2, qkv_bias=bias, nested_config=nested)
    export_draft(checkpoint, base, root / "onnx")
    return request.param, base, checkpoint, root / "onnx"


def text_config(checkpoint) -> dict:
    """A checkpoint's config.json, its text_config's keys lifted to the top (VLMs and their drafts nest them)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    return {**cfg, **cfg.get("text_config", {})}


def reference_forward(checkpoint, embeds, hidden_in, from_draft):
    """The EAGLE3 draft on one sequence of S new tokens at positions 0..S-1, float32 torch."""
    w = {k: v.float() for k, v in load_file(str(checkpoint / "model.safetensors")).items() if v.is_floating_point()}
    cfg = text_config(checkpoint)
    heads, kv_heads, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    def linear(x, name):
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def rotate(x, cos, sin):  # x [S, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    h = linear(hidden_in, "fc") + from_draft
    both = torch.cat([rms(embeds, "midlayer.input_layernorm.weight"), rms(h, "midlayer.hidden_norm.weight")], -1)
    seq = both.shape[0]
    q = linear(both, "midlayer.self_attn.q_proj").view(seq, heads, d)
    k = linear(both, "midlayer.self_attn.k_proj").view(seq, kv_heads, d)
    v = linear(both, "midlayer.self_attn.v_proj").view(seq, kv_heads, d)
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(seq).float()[:, None] * inv_freq
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("shd,thd->hst", q, k) / d**0.5
    scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(seq, heads * d)
    x = h + linear(attn, "midlayer.self_attn.o_proj")
    post = rms(x, "midlayer.post_attention_layernorm.weight")
    gate = linear(post, "midlayer.mlp.gate_proj")
    x = x + linear(torch.nn.functional.silu(gate) * linear(post, "midlayer.mlp.up_proj"), "midlayer.mlp.down_proj")
    logits = linear(rms(x, "norm.weight"), "lm_head")
    return logits.log_softmax(-1), x


def run_draft(onnx_dir, embeds, hidden_in, from_draft):
    """Prefill the draft graph with S tokens, every row selected, the runtime's placeholder tree inputs."""
    cfg = json.loads((onnx_dir / "config.json").read_text())
    seq, d = embeds.shape[0], cfg["head_dim"]
    half = d // 2
    angles = np.arange(16)[:, None] * (1.0 / cfg["rope_theta"] ** (np.arange(half) * 2 / d))
    session = ReferenceEvaluator(str(onnx_dir / "model.onnx"), new_ops=list(REFERENCE_OPS))
    feeds = {
        llm_io.INPUTS_EMBEDS: embeds[None].astype(np.float16),
        llm_io.past_name(0): np.zeros((1, 2, cfg["num_key_value_heads"], 16, d), np.float16),
        llm_io.ROPE_COS_SIN: np.concatenate([np.cos(angles), np.sin(angles)], -1)[None].astype(np.float32),
        llm_io.CONTEXT_LENGTHS: np.array([seq], np.int32),
        llm_io.LAST_TOKEN_IDS: np.arange(seq, dtype=np.int64)[None],
        llm_io.KVCACHE_START_INDEX: np.zeros(0, np.int32),
        llm_io.HIDDEN_STATES_INPUT: hidden_in[None].astype(np.float16),
        llm_io.HIDDEN_STATES_FROM_DRAFT: from_draft[None].astype(np.float16),
        llm_io.ATTENTION_POS_ID: np.zeros((1, 1), np.int32),
        llm_io.ATTENTION_MASK: np.zeros((1, 1, 1), np.int32),
    }
    names = [o.name for o in session.proto_.graph.output]
    result = dict(zip(names, session.run(None, feeds), strict=True))
    return result[llm_io.LOGITS][0], result[llm_io.HIDDEN_STATES][0].astype(np.float32)


@pytest.mark.parametrize("step", ["first (base hidden states)", "later (the draft's own)"])
def test_draft_graph_matches_the_reference_forward(draft, step):
    case, _, checkpoint, onnx_dir = draft
    hidden = text_config(checkpoint)["hidden_size"]
    rng = np.random.default_rng(4)
    embeds = rng.standard_normal((SEQ, hidden)).astype(np.float32) * 0.5
    hidden_in = rng.standard_normal((SEQ, 3 * hidden)).astype(np.float32)
    from_draft = np.zeros((SEQ, hidden), np.float32)
    if step.startswith("later"):
        hidden_in, from_draft = np.zeros_like(hidden_in), rng.standard_normal((SEQ, hidden)).astype(np.float32)
    logits, states = run_draft(onnx_dir, embeds, hidden_in, from_draft)
    with torch.no_grad():
        ref_logits, ref_states = reference_forward(
            checkpoint,
            *(torch.from_numpy(a.astype(np.float16).astype(np.float32)) for a in (embeds, hidden_in, from_draft)),
        )
    # Log-probabilities over the draft vocabulary: they sum to one, and match the reference.
    np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-3)
    result = compare_logits(logits, ref_logits.numpy())
    assert result.passed(TOLERANCES["fp16"]), f"{case}: {result}"
    error = np.abs(states - ref_states.numpy()).max() / np.abs(ref_states.numpy()).max()
    assert error < 5e-3, f"{case}: hidden states {error:.2e} of the largest"


def test_d2t_maps_every_draft_id_to_the_base_id_the_checkpoint_says(draft):
    _, _, checkpoint, onnx_dir = draft
    d2t = load_numpy(str(onnx_dir / "d2t.safetensors"))["d2t"]
    source = load_file(str(checkpoint / "model.safetensors"))
    assert d2t.dtype == np.int32 and d2t.shape == (text_config(checkpoint)["draft_vocab_size"],)
    base_ids = np.arange(len(d2t)) + d2t
    np.testing.assert_array_equal(base_ids, np.flatnonzero(source["t2d"].numpy()))
    np.testing.assert_array_equal(d2t, source["d2t"].numpy())


def test_draft_config_and_directory(draft):
    _, base, _, onnx_dir = draft
    assert {p.name for p in onnx_dir.iterdir()} == {
        "model.onnx",
        "onnx_model.data",
        "config.json",
        "d2t.safetensors",
        "manifest.json",
    }
    config = json.loads((onnx_dir / "config.json").read_text())
    base_hidden = text_config(base)["hidden_size"]
    assert config["model_type"] == "eagle3_draft" and "vocab_size" not in config
    assert config["base_model_hidden_size"] == 3 * base_hidden and config["draft_vocab_size"] == 96


def test_a_nested_draft_config_is_read_where_it_nests(checkpoint_factory, tmp_path):
    """target_hidden_size and draft_vocab_size under text_config count as at the top level."""
    base = checkpoint_factory("qwen2_5_vl")
    checkpoint = make_eagle3_draft(tmp_path / "draft", base, nested_config=True)
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(config) == {"architectures", "model_type", "text_config"}
    config["text_config"]["target_hidden_size"] = 128
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"hidden states of width 128 .* the base's hidden size is 64"):
        export_draft(checkpoint, base, tmp_path / "out")
    config["text_config"]["target_hidden_size"], config["text_config"]["draft_vocab_size"] = 64, 95
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="d2t has 96 entries but draft_vocab_size is 95"):
        export_draft(checkpoint, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_draft_for_another_base_is_refused(checkpoint_factory, tmp_path):
    base = checkpoint_factory("llama")
    checkpoint = make_eagle3_draft(tmp_path / "draft", base)
    config = json.loads((checkpoint / "config.json").read_text())
    config["target_hidden_size"] = 128
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"hidden states of width 128 .* the base's hidden size is 64"):
        export_draft(checkpoint, base, tmp_path / "out")
    config["target_hidden_size"], config["vocab_size"] = 64, 1000
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="vocab_size 1000 differs from the base's"):
        export_draft(checkpoint, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_draft_engine_profiles_span_the_tree(draft):
    """build-engine reads a draft export: prefill and tree-decode profiles over its own inputs."""
    import onnx

    from edgellm_steps.engine import build_engine
    from edgellm_steps.engine.layout import builder_config_of
    from edgellm_steps.engine.limits import BuildLimits
    from edgellm_steps.engine.profiles import engine_profiles

    _, _, _, onnx_dir = draft
    assert build_engine.check_export(onnx_dir).profile == "llm"
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    prefill, decode = engine_profiles(graph, BuildLimits(max_batch_size=2, max_tree_size=60))
    assert decode[llm_io.ATTENTION_MASK][2] == (2, 60, 64)  # the tree, in whole 32-bit words
    assert decode[llm_io.HIDDEN_STATES_INPUT][2][1] == 60 and prefill[llm_io.ATTENTION_MASK][2] == (2, 1, 1)
    assert builder_config_of(build_engine.check_export(onnx_dir), BuildLimits())["eagle_draft"]


def test_a_pytorch_model_bin_draft_exports_the_same_graph(checkpoint_factory, tmp_path):
    """Published drafts often ship pytorch_model.bin: read weights-only, it exports the same bytes as safetensors."""
    import shutil

    base = checkpoint_factory("llama")
    checkpoint = make_eagle3_draft(tmp_path / "draft", base)
    as_bin = shutil.copytree(checkpoint, tmp_path / "draft-bin")
    torch.save(load_file(str(as_bin / "model.safetensors")), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    export_draft(checkpoint, base, tmp_path / "from-safetensors")
    export_draft(as_bin, base, tmp_path / "from-bin")
    for name in ("onnx_model.data", "d2t.safetensors", "config.json"):
        assert (tmp_path / "from-bin" / name).read_bytes() == (tmp_path / "from-safetensors" / name).read_bytes()


class _Crafted:
    """Unpickling this creates a directory: what a malicious checkpoint would do instead."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.makedirs, (self.target,))


def test_a_crafted_pytorch_model_bin_is_refused_and_never_runs(checkpoint_factory, tmp_path, monkeypatch):
    import pickle

    base = checkpoint_factory("llama")
    checkpoint = make_eagle3_draft(tmp_path / "draft", base)
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(checkpoint / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"fc.weight": _Crafted(str(marker))}, handle)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # cannot override an explicit weights_only=True
    with pytest.raises(SourceError, match="refused by the weights-only loader"):
        export_draft(checkpoint, base, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_library_draft_module_is_the_reference_forward(draft):
    """verify-onnx's reference (Eagle3Draft) against the forward written in this file."""
    from edgellm_steps.artifacts.draft_weights import open_draft_store
    from edgellm_steps.models.eagle3_draft import Eagle3Draft

    _, _, checkpoint, _ = draft
    config = json.loads((checkpoint / "config.json").read_text())
    model = Eagle3Draft.from_store(config, open_draft_store(checkpoint))
    rng = np.random.default_rng(5)
    h = text_config(checkpoint)["hidden_size"]
    inputs = [
        torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for shape in ((SEQ, h), (SEQ, 3 * h), (SEQ, h))
    ]
    with torch.no_grad():
        logits, states = model(*(x[None] for x in inputs))
        ref_logits, ref_states = reference_forward(checkpoint, *inputs)
    torch.testing.assert_close(logits[0], ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states[0], ref_states, rtol=1e-4, atol=1e-4)


def test_verify_onnx_checks_a_draft_export(draft, tmp_path):
    from edgellm_steps.errors import ParityError
    from edgellm_steps.verify.verify_onnx import verify_onnx

    _, base, checkpoint, onnx_dir = draft
    summary = verify_onnx(onnx_dir, checkpoint, report=tmp_path / "verify.json")
    assert summary["passed"] and set(summary["cases"]) == {
        "first_step",
        "first_step_hidden_states",
        "later_step",
        "later_step_hidden_states",
    }
    assert json.loads((tmp_path / "verify.json").read_text())["kind"] == "eagle3_draft"
    other = make_eagle3_draft(tmp_path / "other", base, seed=1, std=0.2)  # another draft for the same base
    with pytest.raises(ParityError, match="does not match the draft"):
        verify_onnx(onnx_dir, other)
