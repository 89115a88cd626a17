"""merge-lora streams the checkpoint, and its merged tensors are PEFT's ``merge_and_unload`` bit for bit.

The reference is PEFT's own merge as users run it: the model loaded in float32 by transformers, the
adapter applied by ``PeftModel.from_pretrained``, ``merge_and_unload()``, then the model cast back to the
checkpoint's dtype. The output is read back with the safetensors library, not our reader.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from edgellm_steps.artifacts import shard_rewrite, steps
from edgellm_steps.artifacts.checkpoint import weight_files
from edgellm_steps.artifacts.manifest import check_step_output
from edgellm_steps.errors import SourceError
from edgellm_steps.lora import merge_lora as merge_lora_module
from edgellm_steps.lora.merge_lora import merge_lora, merged_weight
from edgellm_steps.lora.peft_adapter import read_adapter
from edgellm_steps.models.demo import make_lora_adapter

from .support import weights_hashed_as_written

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: rsLoRA with rank and alpha patterns: scalings that are not powers of two, so their rounding shows.
PATTERNS = {"use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"o_proj": 3}}

#: case -> (checkpoint factory arguments, adapter targets, LoraConfig options). The bf16 Qwen2 is sharded (an
#: index and several shards) and its adapter adapts the LM head (PEFT saves the head's weight beside it); the
#: fp16 Phi-3 has fused projections; the float32 Llama keeps the merge's float32 arithmetic unrounded, so
#: a merge computed in another order (scaling A before the product, say) shows there and only there.
CASES = {
    "qwen2-bf16-sharded": (("qwen2-bf16", {"max_shard_size": "60KB"}), [*ATTENTION_AND_MLP, "lm_head"], PATTERNS),
    "phi3": (("phi3-partial-rotary", {}), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
    "llama-float32": (("llama", {"dtype": "float32"}), ATTENTION_AND_MLP, PATTERNS),
}


def peft_merged_state(checkpoint, adapter) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, json.loads((checkpoint / "config.json").read_text())["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype).state_dict()


def read_checkpoint(directory) -> dict[str, torch.Tensor]:
    return {name: t for shard in weight_files(directory) for name, t in load_file(str(shard)).items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_tensors_are_peft_merge_and_unload_bit_for_bit(case, checkpoint_factory, tmp_path):
    (checkpoint_case, overrides), targets, options = CASES[case]
    checkpoint = checkpoint_factory(checkpoint_case, **overrides)
    adapter = tmp_path / "adapter"
    make_lora_adapter(adapter, checkpoint, targets, r=4, lora_alpha=8, b_scale=0.5, **options)
    with pytest.MonkeyPatch.context() as patch:
        weights_hashed_as_written(patch)  # the shards are hashed as written, never read again
        # Slices of a few rows (the last one short), so that every weight is merged and copied in several.
        patch.setattr(merge_lora_module, "MERGE_SLICE_BYTES", 1000)
        patch.setattr(shard_rewrite, "COPY_CHUNK_BYTES", 1000)
        merge_lora(checkpoint, adapter, tmp_path / "merged")
    check_step_output(tmp_path / "merged", steps.MERGE_LORA)

    expected, source, got = (
        peft_merged_state(checkpoint, adapter),
        read_checkpoint(checkpoint),
        read_checkpoint(tmp_path / "merged"),
    )
    assert set(got) == set(source)
    changed = {name for name in got if not torch.equal(got[name], source[name])}
    _, modules = read_adapter(adapter, tensors=True, lm_head=True)
    assert changed == {f"{m.module}.weight" for m in modules}, "not exactly the adapted weights changed"
    for name, tensor in got.items():
        assert tensor.dtype == source[name].dtype and torch.equal(tensor, expected[name]), name
    # The layout and every other file are the source's, byte for byte.
    assert [p.name for p in weight_files(tmp_path / "merged")] == [p.name for p in weight_files(checkpoint)]
    for name in ("config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"):
        if (checkpoint / name).is_file():
            assert (tmp_path / "merged" / name).read_bytes() == (checkpoint / name).read_bytes(), name

    # Controls: the same equality fails a merge that adds in a half-precision checkpoint's dtype, one that scales
    # A before the product (float32), and one with plain LoRA's scaling for the rsLoRA adapter.
    module = next(m for m in modules if m.module.endswith("layers.0.mlp.down_proj"))
    name = f"{module.module}.weight"
    weight, a, b = source[name], module.a.float(), module.b.float()
    if weight.dtype == torch.float32:
        assert not torch.equal(weight + b @ (a * module.scaling), expected[name])
    else:
        assert not torch.equal(weight + ((b @ a) * module.scaling).to(weight.dtype), expected[name])
    if options.get("use_rslora"):
        plain = dataclasses.replace(module, scaling=module.alpha / module.rank)
        assert not torch.equal(merged_weight(weight, plain), expected[name])


def test_an_untouched_shard_is_copied_byte_for_byte(checkpoint_factory, tmp_path):
    """An adapter on layer 0 alone leaves every shard without its weights as the source wrote it."""
    checkpoint = checkpoint_factory("qwen2-bf16", max_shard_size="60KB")
    make_lora_adapter(tmp_path / "adapter", checkpoint, ["q_proj"], layers_to_transform=[0])
    merge_lora(checkpoint, tmp_path / "adapter", tmp_path / "merged")
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    touched = index["model.layers.0.self_attn.q_proj.weight"]
    shards = {shard.name: shard for shard in weight_files(checkpoint)}
    assert len(shards) > 2
    for shard_name, shard in shards.items():
        same = (tmp_path / "merged" / shard_name).read_bytes() == shard.read_bytes()
        assert same == (shard_name != touched), shard_name


def test_a_merge_that_overflows_and_lora_on_a_tied_lm_head_are_refused(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory("phi3-partial-rotary")  # float16: a large B overflows it
    make_lora_adapter(tmp_path / "huge", checkpoint, ["o_proj"], b_scale=1e6)
    with pytest.raises(SourceError, match=r"makes model\.layers\.\d+\.self_attn\.o_proj\.weight overflow"):
        merge_lora(checkpoint, tmp_path / "huge", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    tied = checkpoint_factory("llama-tied")
    make_lora_adapter(tmp_path / "head", tied, ["q_proj", "lm_head"])
    with pytest.raises(SourceError, match="adapts lm_head, which this model ties to its embedding table"):
        merge_lora(tied, tmp_path / "head", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
