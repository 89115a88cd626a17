"""insert-lora and process-lora (contract 6) against transformers with the PEFT adapter applied.

Adapters are made here by ``peft`` on tiny real checkpoints, with random A and B
(``init_lora_weights=False``), so every adapted GEMM changes the logits; the reference is PEFT's
own forward, which shares no code with the graph rewrite or the processing.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import onnx
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.claims import claim_path
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.errors import EdgeLLMError, ParityError, SourceError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.export.lora_sites import read_sites
from edgellm_steps.lora.insert_lora import add_lora, insert_lora
from edgellm_steps.lora.process_lora import process_lora
from edgellm_steps.models.demo import make_lora_adapter
from edgellm_steps.quant.quantize_llm import quantize_llm
from edgellm_steps.verify.parity import TOLERANCES, compare_logits, hf_rope_table
from edgellm_steps.verify.reference import LLMRunner
from edgellm_steps.verify.verify_onnx import verify_onnx

from .support import BIN, tool_env, weights_hashed_as_written

#: case -> (checkpoint case, the modules an adapter targets). Phi-3 fuses q/k/v and gate/up.
CASES = {
    "llama": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ("phi3-partial-rotary", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
SEQ = 12


@pytest.fixture(scope="module", params=sorted(CASES))
def lora_export(request, checkpoint_factory, tmp_path_factory):
    """(case, checkpoint, export dir with lora_model.onnx)."""
    checkpoint = checkpoint_factory(CASES[request.param][0])
    out = tmp_path_factory.mktemp(f"lora-{request.param}") / "llm"
    export_llm(checkpoint, out)
    insert_lora(out)
    return request.param, checkpoint, out


def make_adapter(checkpoint, directory, targets, *, seed=0, r=4, alpha=8, **options):
    """A PEFT adapter with random A and B on ``targets``; returns (PEFT model, directory)."""
    return make_lora_adapter(directory, checkpoint, targets, seed=seed, r=r, lora_alpha=alpha, **options), directory


def graph_logits(onnx_dir, checkpoint, ids, lora=None, graph="lora_model.onnx"):
    table = hf_rope_table(transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)), 32)
    runner = LLMRunner(onnx_dir, table, batch=len(ids), capacity=32, graph=graph, lora=lora)
    return runner.step(ids, all_logits=True)


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def token_ids(seed=3):
    return np.random.default_rng(seed).integers(0, 300, (2, SEQ)).tolist()


def test_the_lora_graph_is_the_contracts(lora_export):
    case, _, out = lora_export
    path = out / "lora_model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    base = onnx.load(str(out / "model.onnx"), load_external_data=False)
    # The same weights file, not a copy: every initializer of both graphs points at onnx_model.data alike.
    assert [t.external_data for t in model.graph.initializer] == [t.external_data for t in base.graph.initializer]
    assert {p.name for p in out.iterdir()} == {
        *("model.onnx", "lora_model.onnx", "onnx_model.data", "config.json", "embedding.safetensors"),
        *("tokenizer.json", "tokenizer_config.json", "processed_chat_template.json", "manifest.json"),
        claim_path(path).name,  # insert-lora's claim on lora_model.onnx, which export-llm's manifest check ignores
    }
    lora_inputs = {i.name: i for i in model.graph.input[len(base.graph.input) :]}
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert len(lora_inputs) == 2 * layers * len(CASES[case][1])
    prefix = "model.layers.0.self_attn.qkv_proj" if case == "phi3" else "model.layers.0.self_attn.q_proj"
    a, b = lora_inputs[f"{prefix}.lora_A.weight"], lora_inputs[f"{prefix}.lora_B.weight"]
    a_dims = [d.dim_value or d.dim_param for d in a.type.tensor_type.shape.dim]
    b_dims = [d.dim_value or d.dim_param for d in b.type.tensor_type.shape.dim]
    hf = json.loads((lora_export[1] / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    fused = head_dim * (hf["num_attention_heads"] + 2 * hf["num_key_value_heads"])
    out_features = fused if case == "phi3" else head_dim * hf["num_attention_heads"]
    assert a_dims == [hf["hidden_size"], f"{prefix}.rank"] and b_dims == [f"{prefix}.rank", out_features]
    assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not any("lm_head" in name for name in lora_inputs)


def test_the_lora_graph_with_an_adapter_matches_peft(lora_export, tmp_path, record_property):
    case, checkpoint, out = lora_export
    model, adapter = make_adapter(checkpoint, tmp_path / "adapter", CASES[case][1])
    processed = process_lora(adapter, tmp_path / "processed", model_dir=checkpoint)
    tensors = load_numpy(str(processed / "processed_adapter_model.safetensors"))
    ids = token_ids()
    expected = reference_logits(model, ids)
    got = graph_logits(out, checkpoint, ids, tensors)
    result = compare_logits(got, expected)
    record_property("relative_error", result.relative_error)
    assert result.passed(TOLERANCES["fp16"]), result
    # The adapter matters: the base model's logits are far from the adapted ones.
    with model.disable_adapter():
        base = reference_logits(model, ids)
    assert not compare_logits(base, expected).passed(TOLERANCES["fp16"])


def test_rank_zero_is_the_base_graph_bit_for_bit(lora_export):
    _, checkpoint, out = lora_export
    ids = token_ids(4)
    lora = graph_logits(out, checkpoint, ids)  # every LoRA input bound with rank 0
    plain = graph_logits(out, checkpoint, ids, graph="model.onnx")
    assert np.array_equal(lora, plain)


def test_two_adapters_through_one_graph(lora_export, tmp_path):
    """Different adapters (other targets, ranks, rsLoRA) through the same graph, each matching PEFT."""
    case, checkpoint, out = lora_export
    targets = CASES[case][1]
    first, first_dir = make_adapter(checkpoint, tmp_path / "a", targets[:2], seed=1, r=2, alpha=16)
    second, second_dir = make_adapter(checkpoint, tmp_path / "b", targets[-2:], seed=2, r=8, alpha=4, use_rslora=True)
    ids = token_ids(5)
    results = []
    for model, adapter in ((first, first_dir), (second, second_dir)):
        processed = process_lora(adapter, adapter.parent / f"{adapter.name}-processed", model_dir=checkpoint)
        tensors = load_numpy(str(processed / "processed_adapter_model.safetensors"))
        results.append((graph_logits(out, checkpoint, ids, tensors), reference_logits(model, ids)))
    for got, expected in results:
        assert compare_logits(got, expected).passed(TOLERANCES["fp16"])
    assert not compare_logits(results[0][0], results[1][0]).passed(TOLERANCES["fp16"])


def test_rank_and_alpha_patterns_scale_as_peft_does(checkpoint_factory, tmp_path):
    """Per-module r and alpha: the processed B equals PEFT's B x PEFT's own scaling of that module."""
    checkpoint = checkpoint_factory("llama")
    model, adapter = make_adapter(
        checkpoint,
        tmp_path / "adapter",
        ["q_proj", "v_proj", "down_proj"],
        r=4,
        alpha=8,
        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
    )
    with pytest.MonkeyPatch.context() as patch:
        weights_hashed_as_written(patch)
        processed = process_lora(adapter, tmp_path / "out")
    check_step_output(processed, steps.PROCESS_LORA)  # the digest taken while writing is the file's
    tensors = load_file(str(processed / "processed_adapter_model.safetensors"))
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            key = name.removeprefix("base_model.model.")
            a = module.lora_A["default"].weight.detach()
            b = module.lora_B["default"].weight.detach() * module.scaling["default"]
            torch.testing.assert_close(tensors[f"{key}.lora_A.weight"].float(), a.T.half().float())
            torch.testing.assert_close(tensors[f"{key}.lora_B.weight"].float(), b.T.half().float())
            checked += 1
    assert checked == 3 * 2
    assert tensors["model.layers.1.mlp.down_proj.lora_A.weight"].shape[1] == 6
    assert tensors["model.layers.0.self_attn.v_proj.lora_A.weight"].shape[1] == 2
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["r"] == 6 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_processed_keys_are_the_graph_inputs(lora_export, tmp_path):
    case, checkpoint, out = lora_export
    _, adapter = make_adapter(checkpoint, tmp_path / "adapter", CASES[case][1])
    keys = set(load_numpy(str(process_lora(adapter, tmp_path / "p") / "processed_adapter_model.safetensors")))
    model = onnx.load(str(out / "lora_model.onnx"), load_external_data=False)
    lora_inputs = {i.name for i in model.graph.input if ".lora_" in i.name}
    assert keys == lora_inputs


def test_adapters_the_runtime_cannot_apply_are_refused(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("llama")
    _, dora = make_adapter(checkpoint, tmp_path / "dora", ["q_proj"], use_dora=True)
    with pytest.raises(SourceError, match="use_dora is set"):
        process_lora(dora, tmp_path / "o1")
    _, biased = make_adapter(checkpoint, tmp_path / "bias", ["q_proj"], bias="lora_only")
    with pytest.raises(SourceError, match="bias 'lora_only'"):
        process_lora(biased, tmp_path / "o2")
    _, saved = make_adapter(checkpoint, tmp_path / "saved", ["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(SourceError, match="modules_to_save"):
        process_lora(saved, tmp_path / "o3")
    # A key the graph has no input for, named in the error (the runtime would give it rank 0, silently).
    _, plain = make_adapter(checkpoint, tmp_path / "plain", ["q_proj"])
    weights = plain / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key.replace("q_proj", "rotary_proj")] = tensors.pop(key)
    tensors[key.replace("q_proj", "rotary_proj").replace("lora_A", "lora_B")] = tensors.pop(
        key.replace("lora_A", "lora_B")
    )
    save_file(tensors, str(weights))
    with pytest.raises(SourceError, match=r"adapter key .*layers\.0\.self_attn\.rotary_proj\.lora_A\.weight targets"):
        process_lora(plain, tmp_path / "o4", model_dir=checkpoint)
    # An adapter for another model (other widths) is refused against this one.
    _, other = make_adapter(
        checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256), tmp_path / "o", ["o_proj"]
    )
    with pytest.raises(SourceError, match=r"adapts model\.layers\.0\.self_attn\.o_proj as 128 -> 128"):
        process_lora(other, tmp_path / "o5", model_dir=checkpoint)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_insert_lora_never_reads_the_weights(checkpoint_factory, tmp_path):
    """With onnx_model.data moved away, insert-lora still writes the same LoRA graph."""
    out = tmp_path / "llm"
    export_llm(checkpoint_factory("llama"), out)
    expected = insert_lora(out).read_bytes()
    (out / "lora_model.onnx").unlink()
    (out / "onnx_model.data").rename(tmp_path / "weights")
    try:
        assert insert_lora(out).read_bytes() == expected
    finally:
        (tmp_path / "weights").rename(out / "onnx_model.data")
    # A LoRA graph is not adapted twice; an edited model.onnx is refused.
    model = onnx.load(str(out / "lora_model.onnx"), load_external_data=False)
    with pytest.raises(EdgeLLMError, match="already has LoRA inputs"):
        add_lora(model, read_sites(model, "lora_model.onnx"))
    with open(out / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EdgeLLMError, match=r"model\.onnx changed after export-llm wrote it"):
        insert_lora(out)


def test_the_clis(lora_export, tmp_path):
    out = lora_export[2]
    result = subprocess.run(
        [str(BIN / "edgellm-process-lora"), "--input_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")],
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr.strip().splitlines()[-1]
    result = subprocess.run(
        [str(BIN / "edgellm-insert-lora"), "--onnx_dir", str(out)], env=tool_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


#: Quantized bases: the LoRA delta reads the activation before quantization (and before SmoothQuant's or AWQ's
#: input scaling), as PEFT's LoRA layer around ModelOpt's quantized Linear does.
QUANTIZED = ("fp8-kvfp8", "int8_sq", "int4_awq", "nvfp4")


@pytest.mark.parametrize("precision", sorted(QUANTIZED))
def test_a_quantized_export_with_an_adapter_matches_modelopt_with_peft(
    checkpoint_factory, tmp_path, precision, monkeypatch, record_property
):
    base = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    quantize_llm(base, tmp_path / "q", precision=precision, calib_size=8, calib_max_tokens=32)
    export_llm(tmp_path / "q", tmp_path / "llm")
    insert_lora(tmp_path / "llm")
    _, adapter = make_adapter(base, tmp_path / "adapter", CASES["llama"][1])  # trained on the float model
    summary = verify_onnx(tmp_path / "llm", tmp_path / "q", adapter=adapter, report=tmp_path / "verify.json")
    assert summary["passed"] and summary["precision"] == precision and summary["adapter"] == str(adapter)
    record_property("relative_error", max(case["relative_error"] for case in summary["cases"].values()))
    # Negative control: the graph fed rank 0 everywhere (an adapter the runtime would not bind) misses PEFT's model.
    monkeypatch.setattr("edgellm_steps.verify.verify_onnx.processed_tensors", lambda modules: {})
    with pytest.raises(ParityError):
        verify_onnx(tmp_path / "llm", tmp_path / "q", adapter=adapter)


def test_lora_engine_profiles_span_rank_zero_to_the_max(lora_export):
    from edgellm_steps.engine.limits import BuildLimits
    from edgellm_steps.engine.profiles import engine_profiles

    out = lora_export[2]
    graph = onnx.load(str(out / "lora_model.onnx"), load_external_data=False)
    name = "model.layers.1.mlp.down_proj"
    for profile in engine_profiles(graph, BuildLimits(max_lora_rank=16)):
        a, b = profile[f"{name}.lora_A.weight"], profile[f"{name}.lora_B.weight"]
        assert [dims[1] for dims in a] == [0, 8, 16] and [dims[0] for dims in b] == [0, 8, 16]


def test_a_lora_engine_directory_links_its_processed_adapters(checkpoint_factory, tmp_path):
    """Engine bytes stand in for TensorRT's; the checks, the layout and the links are real."""
    from edgellm_steps.artifacts.manifest import check_step_output
    from edgellm_steps.engine import build_engine as step
    from edgellm_steps.engine import layout
    from edgellm_steps.engine.limits import BuildLimits

    checkpoint = checkpoint_factory("llama")
    out = tmp_path / "onnx/llm"
    export_llm(checkpoint, out)
    limits = BuildLimits(max_lora_rank=8)
    with pytest.raises(EdgeLLMError, match=r"has no lora_model\.onnx; run edgellm-insert-lora"):
        step.check_lora_graph(out, limits)
    insert_lora(out)
    assert step.check_lora_graph(out, limits) == out / "lora_model.onnx"
    with pytest.raises(EdgeLLMError, match="max_lora_rank is 0"):
        step.check_lora_graph(out, BuildLimits())
    _, adapter = make_adapter(checkpoint, tmp_path / "adapter", ["q_proj", "v_proj"], r=8)
    processed = process_lora(adapter, tmp_path / "lora/tiny/chat", model_dir=checkpoint)
    with pytest.raises(EdgeLLMError, match=r"adapter 'chat' .* has rank 8 but the engine's max_lora_rank is 4"):
        step.check_lora_adapters({"chat": processed}, BuildLimits(max_lora_rank=4))
    adapters = step.check_lora_adapters({"chat": processed}, limits)
    engine = layout.write_engine_dir(
        tmp_path / "engines/sm87/tiny_fp16.engine", out, b"engine", sm=87, limits=limits, lora_adapters=adapters
    )
    link = engine / "lora/chat"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert (link / "processed_adapter_model.safetensors").read_bytes() == (
        processed / "processed_adapter_model.safetensors"
    ).read_bytes()
    manifest = check_step_output(engine, "build-engine")
    assert manifest["parameters"]["lora_adapters"] == ["chat"] and manifest["parameters"]["max_lora_rank"] == 8
    # Reprocessing the adapter changes what the engine directory serves, and the engine stays valid.
    _, again = make_adapter(checkpoint, tmp_path / "adapter2", ["q_proj"], seed=7, r=2)
    process_lora(again, processed, model_dir=checkpoint)
    check_step_output(engine, "build-engine")
    assert set(load_numpy(str(link / "processed_adapter_model.safetensors"))) == {
        f"model.layers.{i}.self_attn.q_proj.lora_{side}.weight" for i in range(2) for side in "AB"
    }
    # A lora_model.onnx made from another model.onnx is refused.
    export_llm(checkpoint_factory("qwen2"), tmp_path / "other")
    (tmp_path / "other/lora_model.onnx").write_bytes((out / "lora_model.onnx").read_bytes())
    with pytest.raises(EdgeLLMError, match=r"was made from another model\.onnx"):
        step.check_lora_graph(tmp_path / "other", limits)


def test_a_merged_adapter_exports_as_the_peft_merged_model(checkpoint_factory, tmp_path):
    """merge-lora then export-llm, against PEFT's own merge_and_unload of the same adapter, run by transformers."""
    from edgellm_steps.lora.merge_lora import merge_lora

    checkpoint = checkpoint_factory("phi3-partial-rotary")
    model, adapter = make_adapter(checkpoint, tmp_path / "adapter", CASES["phi3"][1])
    with pytest.MonkeyPatch.context() as patch:
        weights_hashed_as_written(patch)  # the shards are hashed as written
        merged = merge_lora(checkpoint, adapter, tmp_path / "merged")
    check_step_output(merged, steps.MERGE_LORA)
    export_llm(merged, tmp_path / "llm")
    ids = token_ids(6)
    expected = reference_logits(model.merge_and_unload(), ids)
    got = graph_logits(tmp_path / "llm", checkpoint, ids, graph="model.onnx")
    assert compare_logits(got, expected).passed(TOLERANCES["fp16"])
    base = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint)), ids)
    assert not compare_logits(got, base).passed(TOLERANCES["fp16"])  # the merge changed the model
    onnx_inputs = {i.name for i in onnx.load(str(tmp_path / "llm/model.onnx"), load_external_data=False).graph.input}
    assert not any(".lora_" in name for name in onnx_inputs)
    # A quantized model has no float weights to merge into.
    quantize_llm(checkpoint, tmp_path / "q", precision="fp8", calib_size=2, calib_max_tokens=8)
    with pytest.raises(EdgeLLMError, match="already quantized as fp8; an adapter merges into float weights only"):
        merge_lora(tmp_path / "q", adapter, tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()


def test_a_gptq_export_takes_an_adapter(checkpoint_factory, tmp_path):
    """int4_gptq GEMMs (the repacked plugin) get LoRA inputs too; the reference holds the dequantized weights."""
    from .gptq_checkpoint import write_gptq_checkpoint

    base = checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)
    write_gptq_checkpoint(base, tmp_path / "gptq", tmp_path / "dequantized")
    export_llm(tmp_path / "gptq", tmp_path / "llm")
    insert_lora(tmp_path / "llm")
    _, adapter = make_adapter(base, tmp_path / "adapter", CASES["llama"][1])
    summary = verify_onnx(tmp_path / "llm", tmp_path / "dequantized", adapter=adapter)
    assert summary["passed"], summary


def test_lora_on_lm_head_is_dropped_with_a_warning(checkpoint_factory, tmp_path, caplog):
    """Contract 6: the graph has no lm_head LoRA input, so process-lora drops those keys, and says so."""
    checkpoint = checkpoint_factory("llama")
    _, adapter = make_adapter(checkpoint, tmp_path / "adapter", ["q_proj", "lm_head"])
    with caplog.at_level("WARNING"):
        processed = process_lora(adapter, tmp_path / "p", model_dir=checkpoint)
    keys = set(load_numpy(str(processed / "processed_adapter_model.safetensors")))
    assert keys and all(".self_attn.q_proj." in key for key in keys)
    assert "dropping" in caplog.text and "base_model.model.lm_head." in caplog.text
    _, only_head = make_adapter(checkpoint, tmp_path / "head", ["lm_head"])
    with pytest.raises(SourceError, match="holds no LoRA weights once lm_head and norm tensors are dropped"):
        process_lora(only_head, tmp_path / "p2")
