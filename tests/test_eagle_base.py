"""export-llm --is_eagle_base (contract 3.1-3.4 and 5): the EAGLE3 base graph against transformers.

The base graph takes a speculation tree: its new tokens are tree slots that see the whole
accepted history, and of the tree only their ancestors and themselves. The reference for
the logits of tree node x is transformers run on history + the path from the root to x
as an ordinary sequence, so the tree mask, the tree positions and the CPU plugin's tree
attention are all checked against something that knows nothing of trees.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from edgellm_steps.export import llm_io
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.models.eagle import eagle_hidden_state_indices
from edgellm_steps.models.families import family_for
from edgellm_steps.verify.parity import TOLERANCES, compare_logits, hf_rope_table
from edgellm_steps.verify.reference import LLMRunner

#: Two families; eight layers, so the three exposed hidden states are distinct (entries 2, 4 and 5).
#: Weights drawn with std 0.2 (not 0.02): attention then depends enough on position and content
#: that a wrong tree position or mask moves the logits far beyond the fp16 tolerance.
CASES = {
    "qwen2": {"family": "qwen2", "initializer_range": 0.2},
    "llama": {"family": "llama", "initializer_range": 0.2},
    # A VLM's language model under its own prefixes (InternVL's -hf layout): the base graph is the decoder's.
    "internvl": {"family": "internvl", "initializer_range": 0.2},
    # Phi-4-multimodal's Phi-4-mini decoder (fused projections) beside its vision and audio encoders.
    "phi4mm": {"family": "phi4mm", "initializer_range": 0.2},
}
LAYERS = 8
#: A tree of 5 slots: root 0; children 1 and 2 of the root; 3 under 1; 4 under 3.
PARENTS = (-1, 0, 0, 1, 3)
PROMPT = 6
TOL = TOLERANCES["fp16"]


def tree_mask(parents) -> tuple[np.ndarray, np.ndarray]:
    """(depth of each slot, bit-packed ancestor-or-self mask [S, ceil(S/32)]), written from the contract text."""
    size = len(parents)
    depth = np.zeros(size, np.int64)
    mask = np.zeros((size, -(-size // 32)), np.int64)
    for slot, parent in enumerate(parents):
        node = slot
        while node >= 0:
            mask[slot, node // 32] |= 1 << (node % 32)
            node = parents[node]
        depth[slot] = depth[parent] + 1 if parent >= 0 else 0
    return depth, mask.astype(np.uint32).view(np.int32)


def path(parents, slot) -> list[int]:
    nodes = []
    while slot >= 0:
        nodes.append(slot)
        slot = parents[slot]
    return nodes[::-1]


@pytest.fixture(scope="module", params=sorted(CASES))
def eagle_base(request, checkpoint_factory, tmp_path_factory):
    import transformers

    case = request.param
    options = {k: v for k, v in CASES[case].items() if k != "family"}
    checkpoint = checkpoint_factory(CASES[case]["family"], num_hidden_layers=LAYERS, **options)
    out = tmp_path_factory.mktemp(f"eagle-{case}") / "eagle_base"
    export_llm(checkpoint, out, eagle_base=True)
    auto_class = getattr(transformers, family_for(json.loads((checkpoint / "config.json").read_text())).hf_auto_class)
    model = auto_class.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return case, out, model


def test_the_graph_is_the_contracts_eagle_base(eagle_base):
    _, out, _ = eagle_base
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs[-2:] == [llm_io.ATTENTION_POS_ID, llm_io.ATTENTION_MASK]
    outputs = [o.name for o in graph.output]
    assert outputs[:2] == [llm_io.LOGITS, llm_io.HIDDEN_STATES]
    hidden = next(o for o in graph.output if o.name == llm_io.HIDDEN_STATES).type.tensor_type
    config = json.loads((out / "config.json").read_text())
    assert [d.dim_param or d.dim_value for d in hidden.shape.dim] == [
        "batch_size",
        "seq_len",
        3 * config["hidden_size"],
    ]
    last = next(i for i in graph.input if i.name == llm_io.LAST_TOKEN_IDS).type.tensor_type
    assert [d.dim_param for d in last.shape.dim] == ["batch_size", "num_selected_tokens"]
    plugins = [n for n in graph.node if n.op_type == "AttentionPlugin"]
    assert len(plugins) == LAYERS
    for node in plugins:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["enable_tree_attention"] == 1 and len(node.input) == 7
        assert list(node.input[5:]) == [llm_io.ATTENTION_MASK, llm_io.ATTENTION_POS_ID]
    assert config["model_type"] == "eagle3_base"
    assert json.loads((out / "manifest.json").read_text())["parameters"]["eagle_base"] is True


def test_hidden_states_are_the_three_hf_hidden_states_at_every_position(eagle_base):
    _, out, model = eagle_base
    ids = np.random.default_rng(1).integers(0, model.config.get_text_config().vocab_size, PROMPT).tolist()
    runner = LLMRunner(out, hf_rope_table(model, 16), batch=1, capacity=16)
    runner.step([ids], all_logits=True)
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert eagle_hidden_state_indices(LAYERS) == (2, 4, 5)
    expected = torch.cat([states[2], states[4], states[5]], dim=-1).numpy()
    got = runner.hidden_states.astype(np.float32)
    assert got.shape == expected.shape == (1, PROMPT, 3 * model.config.get_text_config().hidden_size)
    # Each third on its own scale: later layers' states are larger.
    h = model.config.get_text_config().hidden_size
    for k in range(3):
        part, ref = got[..., k * h : (k + 1) * h], expected[..., k * h : (k + 1) * h]
        error = np.abs(part - ref).max() / np.abs(ref).max()
        assert error < 5e-3, f"hidden state {k}: {error:.2e} of its largest value"


def run_tree(out, model, ids, parents, mask=None):
    """Prefill ``ids``, then the tree ``parents`` of tokens in one step; logits of every tree slot."""
    depth, tree = tree_mask(parents)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, model.config.get_text_config().vocab_size, len(parents)).tolist()
    runner = LLMRunner(out, hf_rope_table(model, 32), batch=1, capacity=32)
    runner.step([ids])
    positions = (len(ids) + depth)[None].astype(np.int32)
    logits = runner.step([tokens], all_logits=True, tree=(positions, (tree if mask is None else mask)[None]))
    return tokens, logits[0]


def hf_path_logits(model, ids, tokens, parents) -> np.ndarray:
    rows = []
    with torch.no_grad():
        for slot in range(len(parents)):
            sequence = ids + [tokens[node] for node in path(parents, slot)]
            rows.append(model(torch.tensor([sequence])).logits[0, -1].numpy())
    return np.stack(rows)


def test_tree_logits_equal_transformers_on_each_root_to_node_path(eagle_base):
    case, out, model = eagle_base
    ids = np.random.default_rng(3).integers(0, model.config.get_text_config().vocab_size, PROMPT).tolist()
    tokens, logits = run_tree(out, model, ids, PARENTS)
    result = compare_logits(logits, hf_path_logits(model, ids, tokens, PARENTS))
    assert result.passed(TOL), f"{case}: {result}"


def test_the_tree_mask_decides_what_each_slot_sees(eagle_base):
    """The same tokens read as one causal chain give other logits wherever the tree branches."""
    _, out, model = eagle_base
    ids = np.random.default_rng(3).integers(0, model.config.get_text_config().vocab_size, PROMPT).tolist()
    _, logits = run_tree(out, model, ids, PARENTS)
    chain = (-1, 0, 1, 2, 3)
    _, chain_mask = tree_mask(chain)
    _, as_chain = run_tree(out, model, ids, PARENTS, mask=chain_mask)
    # Slots 0 and 1 see the same in both; slot 2 (a second child of the root) sees slot 1 only in the chain.
    np.testing.assert_allclose(as_chain[:2], logits[:2], rtol=0, atol=1e-5)
    assert np.abs(as_chain[2] - logits[2]).max() > 1e-3


def test_bit_packing_follows_the_contract():
    """Bit j of word w lets a token attend to tree slot 32w + j: slot 33's ancestors in a 40-slot chain."""
    parents = tuple(range(-1, 39))
    _, mask = tree_mask(parents)
    assert mask.shape == (40, 2)
    words = mask.view(np.uint32)
    assert words[33, 0] == 0xFFFFFFFF and words[33, 1] == 0b11  # slots 0..31, then 32 and 33
    assert words[0, 0] == 1 and words[0, 1] == 0


def test_verify_onnx_checks_an_eagle_base_like_any_export(eagle_base):
    """Prefill, decode, chunked prefill and a ragged batch: the runtime's placeholders for the tree inputs."""
    from edgellm_steps.verify.verify_onnx import verify_onnx

    _, out, model = eagle_base
    summary = verify_onnx(out, model.name_or_path)
    assert summary["passed"], summary
