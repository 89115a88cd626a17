"""Sources that would give a broken artifact or a traceback are refused in one line, at planning where knowable.

Each damage below once reached a job: a shard's header or a config that disagrees with the
weights died inside transformers, a VLM whose parts do not fit exported a graph of the wrong
width, a float ``d2t`` was cast to ids, a record claiming fp8 over float weights exported no
quantization at all. The checks read JSON and shard headers only, so most are tested on
:func:`open_checkpoint` directly (what planning and every step call); the workflow tests prove the
plan stops on them before any job, with one line.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm_steps.errors import SourceError
from edgellm_steps.export.export_draft import export_draft
from edgellm_steps.export.export_visual import export_visual
from edgellm_steps.models.demo import make_eagle3_draft, make_lora_adapter
from edgellm_steps.quant.checkpoint_record import open_checkpoint

from .support import WorkdirLayout, copy_checkpoint, plan_error, scenario, write_config

WORKDIR = WorkdirLayout(checkpoint="llama", config=scenario("eagle"), extras=lambda w, base: None)
ONNX = "onnx/tiny_fp16/llm/model.onnx"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target, *rest = key.split("__")
        if rest:
            data[target][rest[0]] = value
        else:
            data[target] = value
    path.write_text(json.dumps(data))


def _rewrite_header(shard: Path, edit) -> None:
    """Rewrite a safetensors header (``edit`` changes the parsed dict in place), keeping the data bytes."""
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _overlap(header: dict) -> None:
    norms = sorted(name for name in header if name.endswith("input_layernorm.weight"))
    header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]


def _index_naming_a_missing_tensor(ckpt: Path) -> None:
    shard = ckpt / "model-00001-of-00001.safetensors"
    (ckpt / "model.safetensors").rename(shard)
    names = load_file(str(shard)).keys()
    weight_map = {**dict.fromkeys(names, shard.name), "model.layers.0.mlp.extra.weight": shard.name}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _fp8_record_over_float_weights(ckpt: Path) -> None:
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    (ckpt / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    (ckpt / "modelopt_state.pth").write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: (c / "model.safetensors").write_bytes(b""), "shorter than the 8-byte header length"),
        (
            lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
            "it is truncated",
        ),
        (
            lambda c: (c / "model.safetensors").write_bytes(
                struct.pack("<Q", 2**40) + (c / "model.safetensors").read_bytes()[8:]
            ),
            "header length 1099511627776 is above",
        ),
        (lambda c: _rewrite_header(c / "model.safetensors", _overlap), "overlap"),
        (_index_naming_a_missing_tensor, "puts tensor 'model.layers.0.mlp.extra.weight' in"),
        (
            lambda c: _edit_json(c / "config.json", intermediate_size=512),
            "config.json says hidden_size 64 and intermediate_size 512, so model.layers.0.mlp.gate_proj.weight "
            "should be [512, 64], but model.safetensors holds [128, 64]",
        ),
        (lambda c: _edit_json(c / "config.json", num_hidden_layers=1), "says num_hidden_layers 1, but the weights"),
        (lambda c: _edit_json(c / "config.json", vocab_size=999), "so model.embed_tokens.weight should be [999, 64]"),
        (_fp8_record_over_float_weights, "says the weights are fp8, but no decoder Linear carries a quantizer scale"),
        (lambda c: _edit_json(c / "config.json", num_attention_heads=0), "num_attention_heads is 0, not a positive"),
        (lambda c: _edit_json(c / "config.json", hidden_size="128x"), "hidden_size is '128x', not a positive integer"),
    ],
    ids=[
        "empty-shard",
        "truncated-shard",
        "header-length-2**40",
        "overlapping-offsets",
        "index-names-a-tensor-no-shard-holds",
        "intermediate-size-disagrees",
        "fewer-layers-than-the-weights",
        "vocab-size-disagrees",
        "fp8-record-without-scales",
        "zero-heads",
        "non-integer-width",
    ],
)
def test_a_damaged_source_is_one_line(checkpoint_factory, tmp_path, damage, expected):
    ckpt = copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(SourceError) as refused:
        open_checkpoint(ckpt, model="tiny")
    message = str(refused.value)
    assert expected in message and "\n" not in message, message
    assert message.startswith(f"model 'tiny' ({ckpt}): "), message


def test_the_intact_source_opens(checkpoint_factory):
    """Negative control: the same checkpoint undamaged passes every check."""
    assert open_checkpoint(checkpoint_factory("qwen2")).dims.intermediate_size == 128


def _vlm_edit(**changes):
    return lambda c: _edit_json(c / "config.json", **changes)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda c: (c / "preprocessor_config.json").write_text("garbage{"), "preprocessor_config.json is not valid"),
        (lambda c: (c / "preprocessor_config.json").unlink(), "has no preprocessor_config.json"),
        (
            lambda c: _edit_json(c / "preprocessor_config.json", patch_size=16),
            "patch_size is 16 but vision_config.patch_size is 14",
        ),
        (
            lambda c: _edit_json(c / "preprocessor_config.json", merge_size=4),
            "merge_size is 4 but vision_config.spatial_merge_size is 2",
        ),
        (
            _vlm_edit(vision_config__out_hidden_size=96),
            "vision_config.out_hidden_size is 96 but the language model's hidden size is 64",
        ),
        (_vlm_edit(vision_config__num_heads=5), "vision_config.num_heads 5 does not divide"),
        (_vlm_edit(vision_config=None), "has no vision_config object"),
    ],
    ids=["processor-garbage", "no-processor", "patch-size", "merge-size", "out-width", "heads", "no-vision-config"],
)
def test_a_vlm_whose_parts_do_not_fit_is_one_line(checkpoint_factory, tmp_path, damage, expected):
    ckpt = copy_checkpoint(checkpoint_factory("qwen2_5_vl"), tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(SourceError, match="") as refused:
        open_checkpoint(ckpt, model="vlm")
    assert expected in str(refused.value), refused.value
    if (ckpt / "config.json").is_file() and json.loads((ckpt / "config.json").read_text())["vision_config"]:
        # The step refuses it the same way, before writing anything.
        with pytest.raises(SourceError, match=expected.split(" but")[0][:40]):
            export_visual(ckpt, tmp_path / "visual")
        assert not (tmp_path / "visual").exists()


def _rewrite_d2t(draft: Path, value) -> None:
    tensors = load_file(str(draft / "model.safetensors"))
    if value is None:
        del tensors["d2t"]
    else:
        tensors["d2t"] = value(tensors["d2t"])
    save_file(tensors, str(draft / "model.safetensors"))


D2T_DAMAGE = {
    "missing": (None, "has no d2t tensor"),
    "float32": (lambda d: d.float(), "d2t is F32, but it holds integer offsets"),
    "bfloat16": (lambda d: d.bfloat16(), "d2t is BF16, but it holds integer offsets"),
    "short": (lambda d: d[:-1], "entries but draft_vocab_size is"),
    "out-of-range": (lambda d: d + 10_000, "d2t maps draft ids outside the base vocabulary"),
}


@pytest.mark.parametrize("case", D2T_DAMAGE)
def test_a_draft_with_a_bad_d2t_is_refused_by_planning_and_by_the_step(checkpoint_factory, tmp_path, case):
    """The planner's check (headers and the d2t table, no torch) and the export step's, on each damage."""
    from edgellm_steps.workflow.model_facts import Facts

    base = checkpoint_factory("llama")
    make_eagle3_draft(tmp_path / "draft", base)
    value, expected = D2T_DAMAGE[case]
    _rewrite_d2t(tmp_path / "draft", value)
    config = {"models": {"tiny": {"source": str(base), "draft": {"source": str(tmp_path / "draft")}}}}
    with pytest.raises(SourceError, match=re.escape(expected)):
        Facts(config, state_dir=tmp_path / "state").model("tiny").draft_checkpoint  # noqa: B018
    # The step refuses it too (a float d2t was once cast to ids; a bfloat16 one died in numpy).
    with pytest.raises(SourceError) as refused:
        export_draft(tmp_path / "draft", base, tmp_path / "draft-export")
    assert expected.replace("F32", "float32").replace("BF16", "bfloat16") in str(refused.value)


@pytest.mark.workflow
def test_a_bad_d2t_stops_the_plan(workdir):
    make_eagle3_draft(workdir / "draft", workdir / "ckpt")
    _rewrite_d2t(workdir / "draft", D2T_DAMAGE["bfloat16"][0])
    assert D2T_DAMAGE["bfloat16"][1] in plan_error(workdir, "onnx/tiny_fp16/draft/model.onnx")


@pytest.mark.workflow
def test_inputs_of_the_config_are_checked_at_planning(workdir):
    """A chat template or corpus that is missing, empty or malformed, a broken source: one line, no job."""
    config = scenario("one_model", model="tiny", source="ckpt")
    cases = {
        "    chat_template: template.json\n": "chat template file template.json is not valid JSON",
        "    chat_template: roles.json\n": "lacks a 'roles' object",
        "    quantization: {dataset: calib/missing.txt}\n": "quantization.dataset: corpus 'calib/missing.txt' does not",
        "    quantization: {dataset: empty.txt}\n": "calibration corpus empty.txt is empty",
        "    reduced_vocab: {size: 100, corpus: empty.txt}\n": "reduced_vocab.corpus: calibration corpus empty.txt is",
    }
    (workdir / "template.json").write_text("{roles")
    (workdir / "roles.json").write_text(json.dumps({"generation_prompt": ""}))
    (workdir / "empty.txt").write_text("\n\n")
    target = {"quantization": "onnx/tiny_fp8/llm/model.onnx"}
    for line, expected in cases.items():
        write_config(workdir, config + line)
        assert expected in plan_error(workdir, target.get(line.split(":")[0].strip(), ONNX)), line
    write_config(workdir, config)
    _edit_json(workdir / "ckpt/config.json", intermediate_size=512)
    assert "the config does not belong to these weights" in plan_error(workdir, ONNX)


@pytest.mark.workflow
def test_an_adapter_config_that_is_not_json_is_one_line(workdir):
    make_lora_adapter(workdir / "adapters/chat", workdir / "ckpt", ["q_proj"], r=4)
    (workdir / "adapters/chat/adapter_config.json").write_text("{not json")
    write_config(workdir, scenario("lora").replace("      code: {source: adapters/code}\n", ""))
    line = plan_error(workdir, "lora/tiny/chat/processed_adapter_model.safetensors")
    assert "adapters/chat/adapter_config.json is not valid JSON" in line and "repair or re-download it" in line


def test_the_vlm_and_draft_checks_pass_what_the_demo_makes(checkpoint_factory, tmp_path):
    """Negative control for the VLM and d2t refusals: intact ones pass them."""
    open_checkpoint(checkpoint_factory("qwen2_5_vl"))
    draft = make_eagle3_draft(tmp_path / "draft", checkpoint_factory("llama"))
    shutil.rmtree(tmp_path / "draft-export", ignore_errors=True)
    export_draft(draft, checkpoint_factory("llama"), tmp_path / "draft-export")
    assert (tmp_path / "draft-export/d2t.safetensors").is_file()
    assert torch.is_tensor(load_file(str(tmp_path / "draft-export/d2t.safetensors"))["d2t"])
