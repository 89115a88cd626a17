"""Engine optimization profiles follow the contract's table (section 8), without TensorRT.

The LLM graph is a real export; EAGLE, LoRA and vision encoder graphs are the
export's inputs plus those the contract adds (sections 3.1, 6 and 7), since only
a graph's inputs decide its profiles.
"""

import onnx
import pytest
from onnx import TensorProto, helper

from edgellm_steps.engine.limits import BuildLimits
from edgellm_steps.engine.profiles import engine_kind, engine_profiles, llm_profiles
from edgellm_steps.errors import EdgeLLMError
from edgellm_steps.export.export_llm import export_llm

DEFAULTS = BuildLimits()
H = 64


@pytest.fixture(scope="module")
def graph(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles") / "llm"
    export_llm(checkpoint_factory("qwen2"), out)
    return onnx.load(str(out / "model.onnx"), load_external_data=False)


def test_prefill_and_decode_profiles(graph):
    bs, il, cap = 4, 1024, 4096
    prefill, decode = llm_profiles(graph, DEFAULTS)
    h, hkv, d = 64, 2, 16
    assert prefill["inputs_embeds"] == ((1, 1, h), (bs, il // 2, h), (bs, il, h))
    assert decode["inputs_embeds"] == ((1, 1, h), (bs, 1, h), (bs, 1, h))
    assert prefill["last_token_ids"] == ((1, 1), (bs, 1), (bs, 1)) == decode["last_token_ids"]
    assert prefill["context_lengths"] == ((1,), (bs,), (bs,)) == decode["context_lengths"]
    assert prefill["kvcache_start_index"] == ((0,), (bs,), (bs,))
    assert decode["kvcache_start_index"] == ((1,), (bs,), (bs,))
    assert prefill["rope_rotary_cos_sin"] == ((1, cap, d), (bs, cap, d), (bs, cap, d)) == decode["rope_rotary_cos_sin"]
    kv = ((1, 2, hkv, 0, d), (bs, 2, hkv, cap, d), (bs, 2, hkv, cap, d))
    assert prefill["past_key_values_0"] == kv == decode["past_key_values_1"]
    assert set(prefill) == {i.name for i in graph.graph.input}


def test_limits_change_the_profiles(graph):
    prefill, _ = llm_profiles(graph, BuildLimits(max_batch_size=2, max_input_len=64, max_kv_cache_capacity=256))
    assert prefill["inputs_embeds"][2] == (2, 64, 64)
    assert prefill["past_key_values_0"][2][3] == 256


def with_inputs(graph, *extra, replace=()):
    """The graph's inputs (some ``replace``d by name) plus ``extra``, as a graph with no nodes."""
    replaced = {value.name: value for value in replace}
    inputs = [replaced.get(value.name, value) for value in graph.graph.input] + list(extra)
    return helper.make_model(helper.make_graph([], "inputs_only", inputs, []))


def tensor(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def eagle_base(graph):
    return with_inputs(
        graph,
        tensor("attention_pos_id", TensorProto.INT32, ["batch_size", "q_len"]),
        tensor("attention_mask", TensorProto.INT32, ["batch_size", "q_len", "q_len_padded"]),
        replace=[tensor("last_token_ids", TensorProto.INT64, ["batch_size", "num_selected_tokens"])],
    )


def test_eagle_base_decode_spans_the_tree(graph):
    bs, il, t = 4, 1024, 60
    prefill, decode = engine_profiles(eagle_base(graph), DEFAULTS)
    assert prefill["inputs_embeds"] == ((1, 1, H), (bs, il // 2, H), (bs, il, H))
    assert decode["inputs_embeds"] == ((1, 1, H), (bs, t // 2, H), (bs, t, H))
    assert prefill["last_token_ids"] == ((1, 1), (bs, 1), (bs, 1))
    assert decode["last_token_ids"] == ((1, 1), (bs, t // 2), (bs, t))
    assert prefill["attention_pos_id"] == ((1, 1), (bs, 1), (bs, 1))
    assert decode["attention_pos_id"] == ((1, 1), (bs, t // 2), (bs, t))
    # The packed mask's last dim is the tree padded to whole 32-bit words: 30 -> 32, 60 -> 64.
    assert prefill["attention_mask"] == ((1, 1, 1), (bs, 1, 1), (bs, 1, 1))
    assert decode["attention_mask"] == ((1, 1, 1), (bs, t // 2, 32), (bs, t, 64))
    assert decode["past_key_values_0"] == llm_profiles(graph, DEFAULTS)[1]["past_key_values_0"]


def test_eagle_draft_hidden_states_follow_the_tokens(graph):
    draft = with_inputs(
        eagle_base(graph),
        tensor("hidden_states_input", TensorProto.FLOAT16, ["batch_size", "seq_len", 3 * H]),
        tensor("hidden_states_from_draft", TensorProto.FLOAT16, ["batch_size", "seq_len", H]),
    )
    prefill, decode = engine_profiles(draft, BuildLimits(max_tree_size=8))
    assert prefill["hidden_states_input"] == ((1, 1, 3 * H), (4, 512, 3 * H), (4, 1024, 3 * H))
    assert decode["hidden_states_input"] == ((1, 1, 3 * H), (4, 4, 3 * H), (4, 8, 3 * H))
    assert decode["hidden_states_from_draft"] == ((1, 1, H), (4, 4, H), (4, 8, H))
    assert decode["attention_mask"] == ((1, 1, 1), (4, 4, 32), (4, 8, 32))


def test_lora_inputs_span_zero_to_the_max_rank(graph):
    k, n = H, 96
    lora = with_inputs(
        graph,
        tensor("model.layers.0.self_attn.q_proj.lora_A.weight", TensorProto.FLOAT16, [k, "q_proj_rank"]),
        tensor("model.layers.0.self_attn.q_proj.lora_B.weight", TensorProto.FLOAT16, ["q_proj_rank", n]),
    )
    for profile in engine_profiles(lora, BuildLimits(max_lora_rank=16)):
        assert profile["model.layers.0.self_attn.q_proj.lora_A.weight"] == ((k, 0), (k, 8), (k, 16))
        assert profile["model.layers.0.self_attn.q_proj.lora_B.weight"] == ((0, n), (8, n), (16, n))


def vision_encoder(patch_dim=1176, rotary_dim=40):
    """The inputs of a Qwen2.5-VL vision encoder export (contract section 7)."""
    inputs = [
        tensor("input", TensorProto.FLOAT16, ["hw", patch_dim]),
        tensor("rotary_pos_emb", TensorProto.FLOAT, ["hw", rotary_dim]),
        tensor("attention_mask", TensorProto.FLOAT16, [1, "hw", "hw"]),
        tensor("window_attention_mask", TensorProto.FLOAT16, [1, "hw", "hw"]),
        tensor("window_index", TensorProto.INT64, ["image_token_len"]),
        tensor("reverse_window_index", TensorProto.INT64, ["image_token_len"]),
    ]
    return helper.make_model(helper.make_graph([], "visual", inputs, []))


def test_vision_engine_has_one_profile_over_image_tokens():
    model = vision_encoder()
    assert engine_kind(model) == "visual"
    [profile] = engine_profiles(model, DEFAULTS)
    # Image tokens 4 / 514 / 1024; the encoder sees four patches per image token.
    assert profile["input"] == ((16, 1176), (2056, 1176), (4096, 1176))
    assert profile["rotary_pos_emb"] == ((16, 40), (2056, 40), (4096, 40))
    assert profile["window_attention_mask"] == ((1, 16, 16), (1, 2056, 2056), (1, 4096, 4096))
    assert profile["window_index"] == ((4,), (514,), (1024,))
    [small] = engine_profiles(model, BuildLimits(min_image_tokens=64, max_image_tokens=256))
    assert small["input"] == ((256, 1176), (640, 1176), (1024, 1176))


def test_vision_limits_must_be_a_range():
    with pytest.raises(EdgeLLMError, match="min_image_tokens <= max_image_tokens"):
        engine_profiles(vision_encoder(), BuildLimits(min_image_tokens=512, max_image_tokens=256))


def test_a_graph_that_is_neither_llm_nor_vision_is_refused():
    model = helper.make_model(helper.make_graph([], "g", [tensor("pixels", TensorProto.FLOAT, [1, 3])], []))
    with pytest.raises(EdgeLLMError, match="exactly one of the inputs inputs_embeds, input"):
        engine_kind(model)


def test_an_unknown_symbolic_dim_is_named(graph):
    odd = with_inputs(graph, tensor("extra", TensorProto.FLOAT16, ["batch_size", "mystery_len"]))
    with pytest.raises(EdgeLLMError, match="input extra has symbolic dim 'mystery_len'"):
        engine_profiles(odd, DEFAULTS)
    # Tree symbols exist only in graphs with tree attention.
    plain = with_inputs(graph, tensor("attention_mask", TensorProto.INT32, ["batch_size", "q_len", "q_len_padded"]))
    with pytest.raises(EdgeLLMError, match="'q_len'"):
        engine_profiles(plain, DEFAULTS)
