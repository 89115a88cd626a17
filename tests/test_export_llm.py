"""export-llm: the contract's graph I/O and sidecars, and numerical parity with transformers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from safetensors.numpy import load_file, save_file

from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.errors import ChatTemplateError, ParityError, UnsupportedArchitectureError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.models.demo import TINY_FAMILIES
from edgellm_steps.models.families import FAMILIES
from edgellm_steps.verify.verify_onnx import verify_onnx

from .support import BIN, TINY_CASES, tool_env

#: Every HF architecture the registry supports, as the error message lists them.
SUPPORTED = sorted(arch for spec in FAMILIES for arch in spec.architectures)


def test_every_family_has_a_tiny_case(checkpoint_factory):
    """The parity cases (TINY_CASES) cover every registry family and every architecture class it names."""
    registry = {spec.family for spec in FAMILIES}
    assert not registry - set(TINY_FAMILIES), "families edgellm_steps.models.demo cannot make a tiny checkpoint of"
    families = {case["family"] for case in TINY_CASES.values()}
    assert families <= registry, f"tiny cases of families the registry lacks: {sorted(families - registry)}"
    assert not registry - families, f"families without a parity case: {sorted(registry - families)}"
    made = {
        arch
        for case in TINY_CASES
        for arch in json.loads((checkpoint_factory(case) / "config.json").read_text())["architectures"]
    }
    assert sorted(made) == SUPPORTED, f"architectures without a parity case: {sorted(set(SUPPORTED) - made)}"


def value_info(graph_values):
    result = {}
    for value in graph_values:
        tensor_type = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        result[value.name] = (tensor_type.elem_type, dims)
    return result


@pytest.mark.parametrize("case", ["qwen2", "llama-tied", "qwen3"])
def test_graph_follows_the_contract(exported, case):
    checkpoint, out = exported(case)
    hf = json.loads((checkpoint / "config.json").read_text())
    layers, hidden, vocab = hf["num_hidden_layers"], hf["hidden_size"], hf["vocab_size"]
    hkv = hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hidden // hf["num_attention_heads"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 19), ("trt", 1)}
    inputs = value_info(model.graph.input)
    kv = [TensorProto.FLOAT16, ["batch_size", 2, hkv, "past_len", head_dim]]
    expected_inputs = [
        ("inputs_embeds", [TensorProto.FLOAT16, ["batch_size", "seq_len", hidden]]),
        *((f"past_key_values_{i}", kv) for i in range(layers)),
        ("rope_rotary_cos_sin", [TensorProto.FLOAT, ["rope_batch_size", "max_position_embeddings", head_dim]]),
        ("context_lengths", [TensorProto.INT32, ["batch_size"]]),
        ("last_token_ids", [TensorProto.INT64, ["batch_size", "num_tokens"]]),
        ("kvcache_start_index", [TensorProto.INT32, ["kv_cache_start_batch_size"]]),
    ]
    assert [(name, list(info)) for name, info in inputs.items()] == expected_inputs
    outputs = value_info(model.graph.output)
    present = [TensorProto.FLOAT16, ["batch_size", 2, hkv, "present_kv_cache_len", head_dim]]
    expected_outputs = [
        ("logits", [TensorProto.FLOAT, ["batch_size", "num_tokens", vocab]]),
        *((f"present_key_values_{i}", present) for i in range(layers)),
    ]
    assert [(name, list(info)) for name, info in outputs.items()] == expected_outputs
    plugins = [n for n in model.graph.node if n.op_type == "AttentionPlugin"]
    assert len(plugins) == layers and all(n.domain == "trt" for n in plugins)
    attrs = {a.name: a.i for a in plugins[0].attribute}
    assert attrs == {
        "num_q_heads": hf["num_attention_heads"],
        "num_kv_heads": hkv,
        "head_size": head_dim,
        "enable_tree_attention": 0,
        "enable_fp8_kv_cache": 0,
    }
    gather = [n for n in model.graph.node if n.op_type == "GatherND"]
    assert len(gather) == 1 and gather[0].attribute[0].i == 1
    external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert external == {"onnx_model.data"}
    assert not any(n.op_type == "Gather" for n in model.graph.node), "the embedding lookup must stay outside the graph"


@pytest.mark.parametrize("case", ["qwen2", "llama-tied"])
def test_sidecars(exported, case):
    checkpoint, out = exported(case)
    hf = json.loads((checkpoint / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert config[key] == hf[key]
    assert config["num_key_value_heads"] == hf["num_key_value_heads"]
    assert config["rope_theta"] == hf["rope_parameters"]["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["head_dim"] == hf["hidden_size"] // hf["num_attention_heads"]
    assert config["partial_rotary_factor"] == 1.0
    assert config["model_type"] == "llm" and config["edgellm_version"] == "0.5.0"
    assert config["model"] == TINY_CASES[case]["family"]
    embedding = load_file(str(out / "embedding.safetensors"))
    assert list(embedding) == ["embedding"]
    assert embedding["embedding"].dtype == np.float16
    assert embedding["embedding"].shape == (hf["vocab_size"], hf["hidden_size"])
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    template = json.loads((out / "processed_chat_template.json").read_text())
    assert set(template["roles"]) == {"system", "user", "assistant"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tokenizer_files_are_the_sources_bytes(exported, case):
    checkpoint, out = exported(case)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name


@pytest.mark.parametrize("case", ["llama3-rope", "llama3-transformers4-config"])
def test_llama3_rope_scaling_reaches_the_config(exported, case):
    _, out = exported(case)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["rope_scaling"]["factor"] == 8.0
    assert config["rope_theta"] == 500000.0
    assert config["original_max_position_embeddings"] == 64


def test_partial_rotary_factor_sizes_the_rope_table(exported):
    _, out = exported("phi3-partial-rotary")
    config = json.loads((out / "config.json").read_text())
    assert config["partial_rotary_factor"] == 0.5 and config["head_dim"] == 16
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    rope = value_info(model.graph.input)["rope_rotary_cos_sin"]
    assert rope == (TensorProto.FLOAT, ["rope_batch_size", "max_position_embeddings", 8])


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_export_matches_transformers(exported, case, tmp_path):
    """Prefill then decode, chunked prefill, and a ragged batch of two (see edgellm_steps.verify.verify_onnx)."""
    checkpoint, out = exported(case)
    summary = verify_onnx(out, checkpoint, report=tmp_path / "report.json")
    assert summary["passed"] and set(summary["cases"]) == {"prefill_decode", "chunked_prefill", "ragged_batch"}
    assert json.loads((tmp_path / "report.json").read_text()) == summary


def test_bf16_source_exports_its_values_as_fp16(exported, tmp_path):
    """A bfloat16 checkpoint (most HF checkpoints are) exports the same weights, converted to float16.

    bfloat16 has 8 significant bits and float16 11, so every bfloat16 value in float16's normal range
    (2**-14 <= |x| <= 65504) converts exactly; smaller ones round to float16 subnormals. Parity is held
    to verify's fp16 criterion (max |err| <= 3% of max |logit|, cosine >= 0.999, same greedy tokens) and
    to 1% of max |logit|: measured 0.06%, as for the float16 checkpoints (the weights are the same
    values; only float16 arithmetic differs from the float32 reference).
    """
    from safetensors.torch import load_file as load_torch_file

    checkpoint, out = exported("qwen2-bf16")
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    source = load_torch_file(str(checkpoint / "model.safetensors"))
    assert {t.dtype for t in source.values()} == {torch.bfloat16}

    summary = verify_onnx(out, checkpoint, report=tmp_path / "report.json")
    assert summary["passed"], summary
    for name, case in summary["cases"].items():
        assert case["relative_error"] <= 1e-2 and case["greedy_match"], (name, case)

    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights["model.embed_tokens.weight"] = load_file(str(out / "embedding.safetensors"))["embedding"]
    assert set(source) <= set(weights), f"not exported: {sorted(set(source) - set(weights))}"
    normal = total = 0
    for name, value in source.items():
        got = weights[name]
        # Linear weights are stored [in, out] (transposed from torch's [out, in]); the embedding table is not.
        if got.ndim == 2 and name != "model.embed_tokens.weight":
            got = got.T
        assert got.dtype == np.float16, name
        np.testing.assert_array_equal(got, value.to(torch.float16).numpy(), err_msg=name)
        exact = (value.float().abs() >= 2**-14).numpy()
        np.testing.assert_array_equal(got.astype(np.float32)[exact], value.float().numpy()[exact], err_msg=name)
        normal, total = normal + exact.sum(), total + exact.size
    assert normal / total > 0.9  # the exact-conversion check covers nearly every weight (biases start at 0)


def test_parity_check_can_fail(exported, tmp_path):
    """A corrupted embedding table must fail verification: the check is not vacuous."""
    checkpoint, out = exported("qwen2")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    table = load_file(str(broken / "embedding.safetensors"))["embedding"]
    save_file({"embedding": np.ascontiguousarray(table[::-1])}, str(broken / "embedding.safetensors"))
    # As an exporter that wrote the wrong table would: its manifest lists what it wrote.
    parameters = json.loads((broken / "manifest.json").read_text())["parameters"]
    write_manifest(broken, step="export-llm", parameters=parameters)
    with pytest.raises(ParityError, match="does not match"):
        verify_onnx(broken, checkpoint, report=tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


def test_verify_cli_exit_codes(exported):
    checkpoint, out = exported("llama-tied")
    command = [str(BIN / "edgellm-verify-onnx"), "--onnx_dir", str(out), "--model_dir", str(checkpoint)]
    assert subprocess.run(command, env=tool_env(), capture_output=True).returncode == 0
    other, _ = exported("llama-mqa")
    result = subprocess.run([*command[:-1], str(other)], env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_unsupported_architecture_lists_supported(tmp_path, checkpoint_factory):
    bad = tmp_path / "gpt2"
    shutil.copytree(checkpoint_factory("qwen2"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(f"supported: {', '.join(SUPPORTED)}") + "$"):
        export_llm(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chat_template_override_is_validated(tmp_path, checkpoint_factory):
    bad = tmp_path / "template.json"
    bad.write_text(json.dumps({"roles": {"system": {"prefix": "", "suffix": ""}}}))
    with pytest.raises(ChatTemplateError, match=r"roles\.user needs string 'prefix' and 'suffix'"):
        export_llm(checkpoint_factory("qwen2"), tmp_path / "out", chat_template=bad)
    good = tmp_path / "good.json"
    roles = {r: {"prefix": f"<{r}>", "suffix": f"</{r}>"} for r in ("system", "user", "assistant")}
    good.write_text(json.dumps({"roles": roles, "generation_prompt": "<assistant>"}))
    export_llm(checkpoint_factory("qwen2"), tmp_path / "out", chat_template=good)
    written = json.loads((tmp_path / "out" / "processed_chat_template.json").read_text())
    assert written["roles"] == roles


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [
            str(BIN / "edgellm-export-llm"),
            "--model_dir",
            str(tmp_path / "missing"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: source directory")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_float16_matmul_of_the_reference_runner_is_numpys_within_one_step():
    """LLMRunner's MatMul multiplies float16 in float32 through BLAS; numpy's float16 matmul accumulates in float
    too, in another order: every result within one float16 step of numpy's, most equal. Control: accumulating in
    float16 (rounding every partial sum) lands further off."""
    from edgellm_steps.verify.reference import MatMul

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape).astype(np.float16) for shape in ((64, 512), (512, 96)))
    want = np.matmul(a, b)
    (got,) = MatMul._run(None, a, b)
    step = np.spacing(np.abs(want)).astype(np.float32)
    off = np.abs(got.astype(np.float32) - want.astype(np.float32))
    assert got.dtype == np.float16 and (off <= step).all() and (off == 0).mean() > 0.9
    partial = np.zeros((64, 96), np.float16)
    for k in range(512):
        partial = (partial + np.outer(a[:, k], b[k]).astype(np.float16)).astype(np.float16)
    assert (np.abs(partial.astype(np.float32) - want.astype(np.float32)) > step).any()
