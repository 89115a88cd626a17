"""quantize-llm and quantized exports: real ModelOpt calibration on tiny models, checked numerically."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, numpy_helper

from edgellm_steps.calibration import builtin_corpus, calibration_samples, load_corpus
from edgellm_steps.demo import train_tokenizer
from edgellm_steps.errors import EdgeLLMError, PrecisionError
from edgellm_steps.export_llm import export_llm
from edgellm_steps.parity import compare_logits, hf_rope_table
from edgellm_steps.plugins.int4_gemm import pack_int4, unpack_int4
from edgellm_steps.quantize_llm import quantize_llm
from edgellm_steps.reference import LLMRunner
from edgellm_steps.verify import verify_onnx

from .conftest import BIN, tool_env

#: precision -> quantize flags (weights, lm_head, kv cache). The model's dims are multiples of 128 (int4).
VARIANTS = {
    "fp8": ("fp8", None, None),
    "int8_sq": ("int8_sq", None, None),
    "int4_awq": ("int4_awq", None, None),
    "fp8-lmfp8-kvfp8": ("fp8", "fp8", "fp8"),
    "fp16-kvfp8": ("fp16", None, "fp8"),
    "int4_awq-lmfp8": ("int4_awq", "fp8", None),
}
CALIB = {"calib_size": 8, "calib_max_tokens": 32}
LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def base(checkpoint_factory):
    return checkpoint_factory("qwen2", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def fp16_export(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "llm"
    export_llm(base, out)
    return out


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    """``quantized(precision)`` -> (quantized checkpoint, export dir), made once per module."""
    done = {}

    def make(precision: str):
        if precision not in done:
            weights, lm_head, kv = VARIANTS[precision]
            root = tmp_path_factory.mktemp(precision)
            quantize_llm(
                base,
                root / "quantized",
                quantization=weights,
                lm_head_quantization=lm_head,
                kv_cache_quantization=kv,
                **CALIB,
            )
            export_llm(root / "quantized", root / "llm")
            done[precision] = (root / "quantized", root / "llm")
        return done[precision]

    return make


def load_graph(out):
    return onnx.load(str(out / "model.onnx"))


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def fake_quant_module(checkpoint, name):
    import modelopt.torch.opt as mto

    mto.enable_huggingface_checkpointing()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return model, model.get_submodule(name)


@pytest.mark.parametrize("precision", sorted(VARIANTS))
def test_quantized_export_matches_the_fake_quantized_model(base, quantized, fp16_export, precision, record_property):
    """Tolerances per format are stated and justified in edgellm_steps.parity.TOLERANCES."""
    checkpoint, out = quantized(precision)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    summary = verify_onnx(out, checkpoint)
    assert summary["passed"] and summary["precision"] == precision, summary
    # Greedy tokens against the fp16 export are reported, not asserted: quantization may change them.
    table = hf_rope_table(transformers.AutoModelForCausalLM.from_pretrained(str(base)), 16)
    ids = np.random.default_rng(5).integers(0, 300, 12).tolist()
    quant_logits = LLMRunner(out, table, batch=1, capacity=16).step([ids], all_logits=True)
    fp16_logits = LLMRunner(fp16_export, table, batch=1, capacity=16).step([ids], all_logits=True)
    agreement = compare_logits(quant_logits, fp16_logits).greedy_agreement
    record_property("greedy_agreement_with_fp16_export", agreement)
    print(f"{precision}: greedy agreement with the fp16 export {agreement:.0%}")


def dequantized_weight(model, precision: str) -> np.ndarray:
    """The graph's weight of LAYER as [N, K] float32, decoded from its initializers."""
    init = initializers(model)
    weight = init[f"{LAYER}.weight"]
    if precision.startswith("int4"):
        scales = init[f"{LAYER}.weight_quantizer.scale"].astype(np.float32)
        return unpack_int4(weight).astype(np.float32) * np.repeat(scales.T, 128, axis=1)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{LAYER}.weight")
    scale = init[dq.input[1]].astype(np.float32)
    return (weight.astype(np.float32) * scale).T


@pytest.mark.parametrize("precision", ["fp8", "int8_sq", "int4_awq"])
def test_graph_weights_are_modelopt_fake_quantized_weights(quantized, precision):
    """Same codes as ModelOpt; only the scale is rounded to float16 (relative error <= 2**-11)."""
    checkpoint, out = quantized(precision)
    _, module = fake_quant_module(checkpoint, LAYER)
    with torch.no_grad():
        expected = module.weight_quantizer(module.weight).numpy()
    got = dequantized_weight(load_graph(out), precision)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=2**-10, atol=1e-7)


def test_fp8_graph_structure(quantized):
    model = load_graph(quantized("fp8-lmfp8-kvfp8")[1])
    init_types = {t.name: t.data_type for t in model.graph.initializer}
    assert init_types[f"{LAYER}.weight"] == TensorProto.FLOAT8E4M3FN
    assert init_types["lm_head.weight"] == TensorProto.FLOAT8E4M3FN
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == 2 * 7 + 1  # every GEMM input, lm_head included
    kv_inputs = [i for i in model.graph.input if i.name.startswith("past_key_values_")]
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN for i in kv_inputs)
    plugin = next(n for n in model.graph.node if n.op_type == "AttentionPlugin")
    assert {a.name: a.i for a in plugin.attribute}["enable_fp8_kv_cache"] == 1
    scales = initializers(model)[plugin.input[5]]
    assert scales.dtype == np.float32 and scales.shape == (2,) and (scales > 0).all()


def test_int8_sq_graph_structure(quantized):
    model = load_graph(quantized("int8_sq")[1])
    init = initializers(model)
    assert init[f"{LAYER}.weight"].dtype == np.int8
    assert f"{LAYER}.input_quantizer._pre_quant_scale" in init  # the smoothing scales
    zero_points = [init[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 for z in zero_points)


def test_int4_graph_structure_and_packing(quantized):
    model = load_graph(quantized("int4_awq")[1])
    gemms = [n for n in model.graph.node if n.op_type == "Int4GroupwiseGemmPlugin"]
    assert len(gemms) == 2 * 7 and all(n.domain == "trt" for n in gemms)
    down = next(n for n in gemms if n.input[1] == f"{LAYER}.weight")
    attrs = {a.name: a.i for a in down.attribute}
    assert attrs == {"gemm_n": 128, "gemm_k": 256, "group_size": 128}
    init = initializers(model)
    assert init[f"{LAYER}.weight"].shape == (64, 256) and init[f"{LAYER}.weight"].dtype == np.int8
    assert init[f"{LAYER}.weight_quantizer.scale"].shape == (2, 128)
    q = np.random.default_rng(0).integers(-8, 8, (6, 5)).astype(np.int8)
    assert np.array_equal(unpack_int4(pack_int4(q)), q)


def test_quantized_layers_shrink(quantized, fp16_export):
    """8-bit weights take half the bytes of fp16, int4 a quarter; scales add at most 1/64 of fp16 (group 128)."""
    fp16 = initializers(load_graph(fp16_export))[f"{LAYER}.weight"].nbytes
    for precision, ratio in (("fp8", 1 / 2), ("int8_sq", 1 / 2), ("int4_awq", 1 / 4)):
        init = initializers(load_graph(quantized(precision)[1]))
        assert init[f"{LAYER}.weight"].nbytes == ratio * fp16, precision
        scales = init.get(f"{LAYER}.weight_quantizer.scale")
        assert scales is None or scales.nbytes <= fp16 / 64, precision


def test_quantized_checkpoint_records_its_precision(quantized):
    checkpoint, out = quantized("int4_awq-lmfp8")
    info = json.loads((checkpoint / "edgellm_quantization.json").read_text())
    assert info["precision"] == "int4_awq-lmfp8" and info["calibration"]["samples"] == 8
    assert info["calibration"]["batch_size"] == 16 and info["calibration"]["corpus"] == "builtin"
    assert (checkpoint / "modelopt_state.pth").is_file() and (checkpoint / "tokenizer.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["parameters"]["precision"] == "int4_awq-lmfp8"


def test_calibration_batch_size_can_be_lowered(base, tmp_path):
    quantize_llm(base, tmp_path / "q", quantization="int4_awq", calib_batch_size=2, **CALIB)
    info = json.loads((tmp_path / "q" / "edgellm_quantization.json").read_text())
    assert info["calibration"]["batch_size"] == 2


def test_int4_refuses_dims_that_are_not_multiples_of_128(checkpoint_factory, tmp_path):
    with pytest.raises(PrecisionError, match=r"multiples of 128.*has 64"):
        quantize_llm(checkpoint_factory("qwen2"), tmp_path / "q", quantization="int4_awq", **CALIB)
    assert not (tmp_path / "q").exists()


def test_quantize_cli_rejects_a_precision_without_a_quantize_step(checkpoint_factory, tmp_path):
    command = [str(BIN / "edgellm-quantize-llm"), "--model_dir", str(checkpoint_factory("qwen2"))]
    command += ["--output_dir", str(tmp_path / "q"), "--quantization", "fp16"]
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "needs no quantize step" in result.stderr.strip().splitlines()[-1]


def test_builtin_corpus_is_offline_and_large_enough():
    corpus = builtin_corpus()
    assert len(corpus) > 1000 and sum(len(t) for t in corpus) > 500_000
    assert corpus == builtin_corpus()


def test_local_corpora(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    assert load_corpus(str(tmp_path / "a.txt")) == ["first paragraph", "second paragraph"]
    assert load_corpus(str(tmp_path)) == ["first paragraph", "second paragraph", "third"]
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(EdgeLLMError, match="has no string 'text' field"):
        load_corpus(str(tmp_path / "bad.jsonl"))


def test_calibration_samples_have_the_requested_shape():
    tokenizer = train_tokenizer("qwen2")
    samples = calibration_samples(tokenizer, ["a short text", "another one"], 5, 16)
    assert len(samples) == 5 and all(len(s) == 16 for s in samples)


@pytest.fixture(scope="module")
def gptq(base, tmp_path_factory):
    from .gptq_checkpoint import write_gptq_checkpoint

    root = tmp_path_factory.mktemp("gptq")
    write_gptq_checkpoint(base, root / "gptq", root / "dequantized")
    return root


def test_gptq_checkpoint_exports_to_the_int4_plugin(gptq, tmp_path):
    out = tmp_path / "llm"
    export_llm(gptq / "gptq", out)
    model = load_graph(out)
    assert sum(n.op_type == "Int4GroupwiseGemmPlugin" for n in model.graph.node) == 2 * 7
    assert json.loads((out / "manifest.json").read_text())["parameters"]["precision"] == "int4_gptq"
    # The reference is the float model holding the dequantized GPTQ weights: same weights, fp16 criterion.
    summary = verify_onnx(out, gptq / "dequantized")
    assert summary["passed"], summary


def test_asymmetric_gptq_is_refused(base, tmp_path):
    from .gptq_checkpoint import write_gptq_checkpoint

    write_gptq_checkpoint(base, tmp_path / "gptq", tmp_path / "dequantized", zero=7)
    with pytest.raises(EdgeLLMError, match="zero points are not all 8"):
        export_llm(tmp_path / "gptq", tmp_path / "llm")
    assert not (tmp_path / "llm").exists()
