"""Bad input fails at planning: one line naming the problem and the fix, no traceback, no job run."""

from __future__ import annotations

import json
import shutil

import pytest

from edgellm_steps.models.families import FAMILIES

from .support import WorkdirLayout, copy_checkpoint, plan_error, run_snakemake, scenario, write_config

pytestmark = pytest.mark.workflow

GOOD = scenario("one_model", model="tiny", source="ckpt")
#: The workdir fixture's layout: a qwen2 checkpoint and the good config.
WORKDIR = WorkdirLayout(checkpoint="qwen2", config=GOOD)


def test_unknown_model_key(workdir):
    line = plan_error(workdir, "onnx/other_fp16/llm/model.onnx")
    assert "unknown model 'other'" in line and "the config defines tiny" in line and "add 'other'" in line


def test_missing_source_directory(workdir):
    write_config(workdir, GOOD.replace("source: ckpt", "source: not-there"))
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "source directory 'not-there' does not exist" in line and "fix source" in line


def test_hub_id_not_in_cache(workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_config(workdir, GOOD.replace("source: ckpt", "source: some-org/some-model"))
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "nor in the HuggingFace cache" in line and "hf download some-org/some-model" in line


def test_source_without_config_json(workdir):
    (workdir / "ckpt" / "config.json").unlink()
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "has no config.json" in line and "point source at the directory" in line


def test_unsupported_architecture(workdir):
    config_path = workdir / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = ["MambaForCausalLM"]
    config_path.write_text(json.dumps(config))
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "unsupported architecture MambaForCausalLM" in line
    supported = sorted(arch for spec in FAMILIES for arch in spec.architectures)
    assert line.endswith(f"supported: {', '.join(supported)}")


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        ("fp7", "unknown weight precision 'fp7'"),
        ("fp16-lmint4", "unknown lm_head precision 'int4'"),
        ("fp16-kvfp8-lmfp8", "malformed precision 'fp16-kvfp8-lmfp8'"),
    ],
)
def test_malformed_precision(workdir, precision, expected):
    line = plan_error(workdir, f"onnx/tiny_{precision}/llm/model.onnx")
    assert expected in line and "<weights>[-lm<lm_head>][-kv<kv_cache>]" in line


def test_precision_below_the_sm_floor(workdir):
    line = plan_error(workdir, "engines/sm80/tiny_fp16-kvfp8.engine")
    assert "fp8" in line


def test_unknown_sm_target(workdir):
    line = plan_error(workdir, "engines/sm81/tiny_fp16.engine")
    assert "unknown SM target sm81" in line


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("models:\n  tiny:\n    source: 3\n", "models.tiny.source: 3 is not of type 'string'"),
        ("models:\n  tiny_x:\n    source: ckpt\n", "'tiny_x' does not match"),
        ("models:\n  tiny:\n    source: ckpt\n    build:\n      max_batch_size: 0\n", "max_batch_size: 0 is less"),
        ("models:\n  tiny:\n    source: ckpt\n    precision: fp16\n", "'precision' was unexpected"),
        ("defaults:\n  precisions: [fp16]\n", "'models' is a required property"),
    ],
)
def test_config_violating_the_schema(workdir, config, expected):
    write_config(workdir, config)
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert expected in line and "invalid config" in line and "fix it in your config file" in line


def test_missing_config(tmp_path):
    line = plan_error(tmp_path, "onnx/tiny_fp16/llm/model.onnx")
    assert "no configuration" in line and "--configfile" in line


def test_a_source_is_checked_only_when_a_target_needs_it(workdir):
    write_config(workdir, GOOD + "  broken:\n    source: nowhere\n")
    result = run_snakemake(workdir, "-n", "onnx/tiny_fp16/llm/model.onnx")
    assert "export_llm" in result.output


def test_int4_on_dims_that_are_not_multiples_of_128(workdir):
    line = plan_error(workdir, "onnx/tiny_int4_awq/llm/model.onnx")
    assert "int4_awq needs GEMM input dims that are multiples of 128" in line and "has 64" in line


def _source_with(workdir, checkpoint_factory, **shape) -> None:
    """The workdir's source replaced by a real checkpoint of ``shape`` (config and weights agree)."""
    shutil.rmtree(workdir / "ckpt")
    copy_checkpoint(checkpoint_factory("qwen2", **shape), workdir / "ckpt")


def test_nvfp4_on_dims_that_are_not_multiples_of_16(workdir, checkpoint_factory):
    _source_with(workdir, checkpoint_factory, intermediate_size=200)
    line = plan_error(workdir, "onnx/tiny_nvfp4/llm/model.onnx")
    assert "nvfp4 needs GEMM input dims that are multiples of 16" in line
    assert "mlp.down_proj (intermediate_size) has 200" in line


def test_nvfp4_lm_head_engine_below_sm100(workdir):
    line = plan_error(workdir, "engines/sm90/tiny_fp8-lmnvfp4.engine")
    assert "needs SM >= 100" in line and "sm90 cannot run it" in line


def test_fp8_engine_below_sm89(workdir):
    line = plan_error(workdir, "engines/sm87/tiny_fp8.engine")
    assert "needs SM >= 89" in line and "sm87 cannot run it" in line


def test_int4_gptq_needs_a_gptq_checkpoint(workdir):
    line = plan_error(workdir, "onnx/tiny_int4_gptq/llm/model.onnx")
    assert "int4_gptq exports a checkpoint already quantized with GPTQ" in line and "int4_awq" in line


def _write(path, text: str) -> None:
    path.write_text(text)


def _index(workdir, weight_map) -> None:
    _write(workdir / "ckpt/model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def _move_weights_to_shard(workdir) -> dict:
    """Rename model.safetensors to a shard and return a weight map naming it."""
    from safetensors import safe_open

    with safe_open(str(workdir / "ckpt/model.safetensors"), "np") as shard:
        names = list(shard.keys())
    (workdir / "ckpt/model.safetensors").rename(workdir / "ckpt/model-00001-of-00001.safetensors")
    return dict.fromkeys(names, "model-00001-of-00001.safetensors")


def _bad_tokenizer(workdir) -> None:
    """A tokenizer that loads but knows two tokens: what transformers builds from nothing."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>"))
    tokenizer.save(str(workdir / "ckpt/tokenizer.json"))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda w: (w / "ckpt/tokenizer.json").unlink(), "has no tokenizer.json, which the Edge-LLM runtime needs"),
        (
            lambda w: _write(w / "ckpt/tokenizer.json", "{not json"),
            "is not a tokenizer the tokenizers library can load",
        ),
        (_bad_tokenizer, "encodes an English sentence to 1 distinct token(s), so it cannot tokenize text"),
        (lambda w: _write(w / "ckpt/config.json", "[1, 2]"), "holds a JSON list, not the object of an HF config"),
        (lambda w: _write(w / "ckpt/model.safetensors.index.json", "{oops"), "is not valid JSON"),
        (lambda w: _write(w / "ckpt/model.safetensors.index.json", '{"metadata": {}}'), "weight_map"),
        (lambda w: _index(w, {"a": "../outside.safetensors"}), "../outside.safetensors"),
        (lambda w: _index(w, {"a": "/etc/passwd"}), "/etc/passwd"),
        (lambda w: _index(w, {"a": "model-00001-of-00002.safetensors"}), "disagree"),
        (lambda w: (w / "ckpt/model.safetensors").rename(w / "ckpt/pytorch_model.bin"), "pickled"),
    ],
    ids=[
        "no-tokenizer",
        "tokenizer-not-json",
        "tokenizer-cannot-encode",
        "config-not-object",
        "index-not-json",
        "index-without-weight-map",
        "index-entry-outside",
        "index-entry-absolute",
        "index-and-single-file-disagree",
        "bin-only",
    ],
)
def test_checkpoint_validation_at_planning(workdir, damage, expected):
    damage(workdir)
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert expected in line and "model 'tiny'" in line


def test_a_sharded_index_alone_is_accepted(workdir):
    _index(workdir, _move_weights_to_shard(workdir))
    assert "export_llm" in run_snakemake(workdir, "-n", "onnx/tiny_fp16/llm/model.onnx").output


def test_an_unsupported_quantized_source(workdir):
    config = json.loads((workdir / "ckpt/config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (workdir / "ckpt/config.json").write_text(json.dumps(config))
    line = plan_error(workdir, "onnx/tiny_fp16/llm/model.onnx")
    assert "quant_method 'bitsandbytes' is not supported" in line and "supported pre-quantized sources" in line


def test_int4_output_rows_in_groups_of_four(workdir, checkpoint_factory):
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 64, "head_dim": 2}
    _source_with(workdir, checkpoint_factory, **shape, num_key_value_heads=1)
    line = plan_error(workdir, "onnx/tiny_int4_awq/llm/model.onnx")
    assert "int4_awq packs output rows in groups of 4" in line and "k_proj/v_proj" in line and "has 2 rows" in line
