"""Engine optimization profiles follow the contract's table (section 8), without TensorRT."""

import onnx
import pytest

from edgellm_steps.config import BuildLimits
from edgellm_steps.engine_profiles import llm_profiles
from edgellm_steps.export_llm import export_llm

DEFAULTS = BuildLimits(max_batch_size=4, max_input_len=1024, max_kv_cache_capacity=4096, max_lora_rank=0)


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
    prefill, _ = llm_profiles(
        graph, BuildLimits(max_batch_size=2, max_input_len=64, max_kv_cache_capacity=256, max_lora_rank=0)
    )
    assert prefill["inputs_embeds"][2] == (2, 64, 64)
    assert prefill["past_key_values_0"][2][3] == 256
