"""quantize-draft: real ModelOpt calibration of tiny EAGLE3 drafts through their base, checked numerically.

The exports are held to ModelOpt's own fake-quantized draft (verify-onnx), and the calibration
itself to transformers: the ``fc`` input range must be the range of the base's hidden states
that contract 5 names, computed here from ``output_hidden_states`` without the library's code.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto
from safetensors.torch import load_file, save_file

from edgellm_steps.errors import ParityError, PrecisionError
from edgellm_steps.export.export_draft import export_draft
from edgellm_steps.models.demo import make_eagle3_draft
from edgellm_steps.quant.calibration import calibration_samples, corpus_texts
from edgellm_steps.quant.quantize_draft import quantize_draft
from edgellm_steps.quant.quantize_llm import quantize_llm
from edgellm_steps.verify.verify_onnx import verify_onnx

from .support import BIN, tool_env

#: Eight base layers: contract 5's hidden states [2, (n-1)//2, n-4] with n = 9 are entries 2, 4 and 5
#: of transformers' output_hidden_states, three distinct layers.
LAYERS = 8
PICKED = (2, 4, 5)
#: case -> (base, q/k/v biases in the draft, config nested under text_config, quantize flags, precision).
#: The text bases' dims are multiples of 128 (int4, nvfp4); the VLM base (Qwen2.5-VL) keeps its tiny dims.
VARIANTS = {
    "fp8-kvfp8": ("qwen2", True, False, ("fp8", None, "fp8"), "fp8-kvfp8"),
    "int4_awq": ("llama", False, False, ("int4_awq", None, None), "int4_awq"),
    "nvfp4-lmnvfp4": ("llama", False, False, ("nvfp4", "nvfp4", None), "nvfp4-lmnvfp4"),
    "vlm-fp8": ("qwen2_5_vl", False, True, ("fp8", None, None), "fp8"),
}
CALIB = {"calib_size": 8, "calib_max_tokens": 32}
MIDLAYER_GEMMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
MIDLAYER_GEMMS += ("mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def bases(checkpoint_factory):
    wide = {"hidden_size": 128, "intermediate_size": 256}
    made = {family: checkpoint_factory(family, num_hidden_layers=LAYERS, **wide) for family in ("qwen2", "llama")}
    return {**made, "qwen2_5_vl": checkpoint_factory("qwen2_5_vl", num_hidden_layers=LAYERS)}


@pytest.fixture(scope="module")
def quantized(bases, tmp_path_factory):
    """``quantized(variant)`` -> (base, float draft, quantized draft, export dir), made once per module."""
    done = {}

    def make(variant: str):
        if variant not in done:
            family, bias, nested, _, precision = VARIANTS[variant]
            root = tmp_path_factory.mktemp(f"qdraft-{variant}")
            # std 0.02 (the default): sharper random drafts put fp8's own float16 noise floor above any tolerance.
            draft = make_eagle3_draft(root / "draft", bases[family], qkv_bias=bias, nested_config=nested)
            out = quantize_draft(
                bases[family],
                draft,
                root / "q",
                precision=precision,
                **CALIB,
            )
            export_draft(out, bases[family], root / "onnx")
            done[variant] = (bases[family], draft, out, root / "onnx")
        return done[variant]

    return make


def load_graph(onnx_dir) -> onnx.ModelProto:
    return onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_quantized_draft_export_matches_the_fake_quantized_draft(quantized, variant, tmp_path, record_property):
    _, _, checkpoint, onnx_dir = quantized(variant)
    precision = VARIANTS[variant][-1]
    summary = verify_onnx(onnx_dir, checkpoint, report=tmp_path / "verify.json")
    assert summary["passed"] and summary["precision"] == precision
    assert set(summary["cases"]) == {"first_step", "first_step_hidden_states", "later_step", "later_step_hidden_states"}
    for case, result in summary["cases"].items():
        record_property(case, result["relative_error"])
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["step"] == "export-draft" and manifest["parameters"]["precision"] == precision
    info = json.loads((checkpoint / "edgellm_quantization.json").read_text())
    assert info["kind"] == "eagle3_draft" and info["precision"] == precision


def test_a_wrong_scale_in_the_export_fails_verify(quantized, tmp_path):
    """Negative control: fc's weights clipped to 30% of their range in the export input, reference untouched.

    Measured: 15.5% of max |hidden| on the first step against the 8% fp8 bound (3.3% unclipped).
    """
    base, _, checkpoint, _ = quantized("fp8-kvfp8")
    tampered = shutil.copytree(checkpoint, tmp_path / "tampered")
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["fc.weight_quantizer._amax"] *= 0.3
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    export_draft(tampered, base, tmp_path / "onnx")
    with pytest.raises(ParityError):
        verify_onnx(tmp_path / "onnx", checkpoint)


def _whole_base_quantized_draft(base, draft, precision: str) -> dict[str, torch.Tensor]:
    """The draft quantized as ModelOpt does with the whole float base loaded by transformers: its hidden states
    from ``output_hidden_states``, ``mtq.quantize`` with the same recipe and the same two draft steps."""
    import modelopt.torch.quantization as mtq

    from edgellm_steps.artifacts.draft_weights import open_draft_store
    from edgellm_steps.models.eagle3_draft import Eagle3Draft
    from edgellm_steps.quant.calibration import calibration_batches
    from edgellm_steps.quant.draft_quantizers import register_draft_attention
    from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
    from edgellm_steps.quant.precision import parse_precision
    from edgellm_steps.quant.recipes import calibration_batch_size, modelopt_config

    parsed = parse_precision(precision)
    batches = calibration_batches(
        base, None, CALIB["calib_size"], CALIB["calib_max_tokens"], calibration_batch_size(parsed)
    )
    vlm = "vision_config" in json.loads((base / "config.json").read_text())
    auto = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    base_model = auto.from_pretrained(str(base), dtype=torch.float32).eval()
    register_draft_attention()
    model = Eagle3Draft.from_store(json.loads((draft / "config.json").read_text()), open_draft_store(draft))

    def forward_loop(quant_model) -> None:
        with torch.no_grad():
            for ids in batches:
                states = base_model(ids, output_hidden_states=True).hidden_states
                hidden_in = torch.cat([states[i] for i in PICKED], dim=-1)[:, :-1]
                embeds = base_model.get_input_embeddings()(ids[:, 1:])
                _, own = quant_model(embeds, hidden_in, torch.zeros_like(embeds))
                quant_model(embeds[:, 1:], torch.zeros_like(hidden_in[:, 1:]), own[:, :-1])

    with cpu_fake_quantization():
        mtq.quantize(model.to(torch.float32), modelopt_config(parsed), forward_loop=forward_loop)
    return {name: value.detach() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["fp8-kvfp8", "vlm-fp8"])
def test_the_base_run_layer_by_layer_gives_exactly_the_whole_base_calibration(quantized, variant):
    """quantize-draft never loads the whole base (its layers up to the deepest picked state run one at a time):
    every tensor of the quantized draft equals ModelOpt's calibration through the whole base, bit for bit."""
    base, draft, checkpoint, _ = quantized(variant)
    want = _whole_base_quantized_draft(base, draft, VARIANTS[variant][-1])
    got = load_file(str(checkpoint / "model.safetensors"))
    assert set(want) <= set(got)
    different = [n for n, v in want.items() if got[n].dtype != v.dtype or not torch.equal(got[n], v)]
    assert not different, different[:5]
    assert any(name.endswith("_quantizer._amax") for name in want)


@pytest.mark.parametrize("variant", ["fp8-kvfp8", "vlm-fp8"])
def test_fc_is_calibrated_on_the_base_hidden_states_contract_5_names(quantized, variant):
    """fc's input range is max |concat(HF hidden states 2, 4, 5)| over the calibration tokens but the last.

    The second calibration pass (the draft's own states) feeds fc zeros from the base, so it cannot
    raise the range; nothing else reaches fc's input. A VLM base runs text-only, as transformers'
    image-text-to-text model, whose hidden states are its language model's.
    """
    base, _, checkpoint, _ = quantized(variant)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    ids = torch.tensor(
        calibration_samples(tokenizer, corpus_texts(None), CALIB["calib_size"], CALIB["calib_max_tokens"])
    )
    vlm = "vision_config" in json.loads((base / "config.json").read_text())
    auto = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    assert len(states) == LAYERS + 1
    expected = max(states[i][:, :-1].abs().max().item() for i in PICKED)
    got = load_file(str(checkpoint / "model.safetensors"))["fc.input_quantizer._amax"].float()
    assert got.numel() == 1
    assert got.item() == pytest.approx(expected, rel=1e-4)
    # The wrong layers or the last position would give another range on this base.
    others = max(states[i][:, :-1].abs().max().item() for i in (1, 3, 6))
    assert others != pytest.approx(expected, rel=1e-3)


def test_fp8_draft_graph_structure(quantized):
    model = load_graph(quantized("fp8-kvfp8")[3])
    init = {t.name: t.data_type for t in model.graph.initializer}
    assert init["fc.weight"] == init["midlayer.mlp.down_proj.weight"] == TensorProto.FLOAT8E4M3FN
    assert init["lm_head.weight"] == TensorProto.FLOAT16
    past = next(i for i in model.graph.input if i.name == "past_key_values_0")
    assert past.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN
    plugin = next(n for n in model.graph.node if n.op_type == "AttentionPlugin")
    assert {a.name: a.i for a in plugin.attribute}["enable_fp8_kv_cache"] == 1
    # fc and the seven midlayer GEMMs each quantize their input; lm_head stays float16.
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 1 + 7


def test_int4_draft_graph_structure(quantized):
    model = load_graph(quantized("int4_awq")[3])
    gemms = {
        n.input[1]: {a.name: a.i for a in n.attribute}
        for n in model.graph.node
        if n.op_type == "Int4GroupwiseGemmPlugin"
    }
    assert set(gemms) == {"fc.weight"} | {f"midlayer.{m}.weight" for m in MIDLAYER_GEMMS}
    assert gemms["fc.weight"] == {"gemm_n": 128, "gemm_k": 3 * 128, "group_size": 128}
    assert gemms["midlayer.self_attn.q_proj.weight"]["gemm_k"] == 2 * 128


def test_nvfp4_draft_graph_structure(quantized):
    model = load_graph(quantized("nvfp4-lmnvfp4")[3])
    assert {o.domain: o.version for o in model.opset_import}[""] == 23  # FLOAT4E2M1 needs opset 23
    init = {t.name: t.data_type for t in model.graph.initializer}
    for module in ("fc", "midlayer.self_attn.q_proj", "lm_head"):
        assert init[f"{module}.weight"] == TensorProto.FLOAT4E2M1
        assert init[f"{module}.weight_quantizer.block_scale"] == TensorProto.FLOAT8E4M3FN
    assert sum(n.op_type == "TRT_FP4DynamicQuantize" for n in model.graph.node) == 1 + 7 + 1


def test_the_quantized_draft_keeps_the_vocabulary_maps(quantized):
    _, draft, checkpoint, onnx_dir = quantized("int4_awq")
    source, out = load_file(str(draft / "model.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert torch.equal(out["d2t"], source["d2t"]) and torch.equal(out["t2d"], source["t2d"])
    assert (checkpoint / "config.json").read_bytes() == (draft / "config.json").read_bytes()
    d2t = load_file(str(onnx_dir / "d2t.safetensors"))["d2t"]
    assert torch.equal(d2t, source["d2t"])


def test_refusals_leave_nothing_behind(bases, quantized, checkpoint_factory, tmp_path):
    base = bases["llama"]
    _, draft, quantized_draft, _ = quantized("int4_awq")
    with pytest.raises(PrecisionError, match="needs no quantize step"):
        quantize_draft(base, draft, tmp_path / "a", precision="fp16", **CALIB)
    with pytest.raises(PrecisionError, match="the draft is already quantized as int4_awq"):
        quantize_draft(base, quantized_draft, tmp_path / "b", precision="fp8", **CALIB)
    small = checkpoint_factory("qwen2")  # hidden 64: fc reads 192 columns
    with pytest.raises(PrecisionError, match=r"fc \(3 x target_hidden_size\).*192"):
        quantize_draft(
            small, make_eagle3_draft(tmp_path / "small", small), tmp_path / "c", precision="int4_awq", **CALIB
        )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_quantized_base_is_refused(bases, quantized, tmp_path):
    base = bases["llama"]
    quantize_llm(base, tmp_path / "qbase", precision="fp8", **CALIB)
    _, draft, _, _ = quantized("int4_awq")
    with pytest.raises(PrecisionError, match=r"the base is already quantized as fp8.*unquantized base"):
        quantize_draft(tmp_path / "qbase", draft, tmp_path / "q", precision="fp8", **CALIB)
    assert not (tmp_path / "q").exists()


def test_the_cli_reports_a_refusal_in_one_line(bases, quantized, tmp_path):
    _, draft, _, _ = quantized("int4_awq")
    command = [str(BIN / "edgellm-quantize-draft"), "--base_model_dir", str(bases["llama"])]
    command += ["--draft_model_dir", str(draft), "--output_dir", str(tmp_path / "q"), "--precision", "fp16"]
    result = subprocess.run(command, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "needs no quantize step" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "q").exists()


def test_calibration_on_another_draft_gives_other_scales(quantized, tmp_path):
    """The scales come from this draft's activations: a differently seeded draft calibrates differently."""
    base, _, checkpoint, _ = quantized("fp8-kvfp8")
    other = make_eagle3_draft(tmp_path / "other", base, seed=1, qkv_bias=True)
    out = quantize_draft(base, other, tmp_path / "q", precision="fp8-kvfp8", **CALIB)
    ours, theirs = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "midlayer.mlp.down_proj.input_quantizer._amax"
    assert not np.isclose(ours[name].item(), theirs[name].item(), rtol=1e-3)
    # ... while fc's input range is the base's alone, whatever the draft.
    assert ours["fc.input_quantizer._amax"].item() == pytest.approx(theirs["fc.input_quantizer._amax"].item(), rel=1e-6)
