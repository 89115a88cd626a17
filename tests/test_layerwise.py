"""quantize-llm calibrates one decoder layer at a time; its checkpoint must be exactly ModelOpt's whole-model one.

The reference is ModelOpt's own whole-model path, written here from its public API and independent of
``quant/layerwise.py``: the model loaded whole by transformers in float32, ``mtq.quantize`` with the same
recipe and forward loop over the same batches, ``save_pretrained`` and ``mto.modelopt_state``. Every saved
tensor (weights with SmoothQuant / AWQ scales folded in, every ``_amax`` and ``_pre_quant_scale``) must be
bit-identical, the configs equal and the ModelOpt state equal (as data: pickle may share equal objects
differently, so the file's bytes are not compared), for each family and each part of the precision
grammar (weights alone, an LM head, a KV cache, tied embeddings, fused projections, a VLM's renamed decoder and
its untouched vision tower); and the same from the shared statistics pass (calibrate-llm) for every precision it
serves. Controls: a different calibration set (either way), or the per-layer loop fed layer i's inputs instead of
its outputs, must differ; statistics of another model are refused.
"""

from __future__ import annotations

import copy
import json
from fnmatch import fnmatchcase

import pytest
import torch

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.sources import read_hf_config
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import family_for
from edgellm_steps.quant import layerwise
from edgellm_steps.quant.calibrate_llm import calibrate_llm
from edgellm_steps.quant.calibration import calibration_batches
from edgellm_steps.quant.exclusions import decoder_linears, excluded_linears, exclusion_patterns
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
from edgellm_steps.quant.precision import parse_precision
from edgellm_steps.quant.prequantized import MODELOPT_STATE, load_modelopt_state
from edgellm_steps.quant.quantize_llm import quantize_llm, stable_modelopt_state
from edgellm_steps.quant.recipes import calibration_batch_size, modelopt_config

SAMPLES, TOKENS = 4, 32

#: (checkpoint case, precision): every weight algorithm (max, SmoothQuant, AWQ-lite, NVFP4's two levels), LM head
#: and KV quantizers, tied embeddings, fused qkv / gate_up (Phi-3), qk norms (Qwen3), a VLM (renamed decoder,
#: mrope positions, a vision tower ModelOpt converts but never calibrates; Qwen3-VL's interleaved mrope and
#: deepstack-fed decoder; InternVL's decoder under its -hf prefixes beside a tower and projector left float;
#: Phi-4-multimodal's beside its vision and audio encoders).
CASES = [
    ("qwen2", "fp8"),
    ("qwen2", "int8_sq"),
    ("qwen2", "int4_awq"),
    ("qwen2", "nvfp4-lmnvfp4-kvfp8"),
    ("llama-tied", "int8_sq-lmfp8"),
    ("phi3", "int4_awq-kvfp8"),
    ("qwen3", "fp8-lmfp8-kvfp8"),
    ("qwen2_vl", "fp8"),
    ("qwen3_vl", "fp8"),
    ("internvl", "int8_sq-kvfp8"),
    ("phi4mm", "fp8"),
]

WIDE = {"hidden_size": 128, "intermediate_size": 256}
#: quantization.exclude in two cases: Linears kept float beside SmoothQuant, and in a VLM's renamed decoder.
EXCLUDE = {("qwen2", "int8_sq"): ("model.layers.0.self_attn.*",), ("qwen2_vl", "fp8"): ("*.layers.1.mlp.*",)}


def modelopt_whole_model(checkpoint, output, precision: str, exclude: tuple[str, ...] = ()) -> None:
    """ModelOpt's whole-model quantization of ``checkpoint``, saved as transformers and ModelOpt save it."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    import transformers

    parsed = parse_precision(precision)
    spec = family_for(read_hf_config(checkpoint), where=str(checkpoint))
    batches = calibration_batches(checkpoint, None, SAMPLES, TOKENS, calibration_batch_size(parsed))
    model = getattr(transformers, spec.hf_auto_class).from_pretrained(
        str(checkpoint), dtype=torch.float32, use_safetensors=True
    )

    def forward_loop(quant_model) -> None:
        with torch.no_grad():
            for ids in batches:
                quant_model(ids)

    store = TensorStore(checkpoint)
    excluded = excluded_linears(exclude, decoder_linears(store, spec.resolved(store.names())), str(checkpoint))
    config = modelopt_config(parsed, spec.quant_exclude + exclusion_patterns(excluded, spec.hf_renames))
    with cpu_fake_quantization():
        mtq.quantize(model.eval(), config, forward_loop=forward_loop)
    model.save_pretrained(str(output))
    torch.save(stable_modelopt_state(mto.modelopt_state(model)), output / MODELOPT_STATE)


def _tensors(directory) -> dict[str, torch.Tensor]:
    store = TensorStore(directory)
    return {name: store.get(name) for name in store.names()}


def _same(a, b) -> bool:
    """Structural equality where tensors compare by dtype and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        return both and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_modelopts(got_dir, want_dir, source) -> None:
    """``got_dir`` holds exactly ModelOpt's whole-model checkpoint ``want_dir``: tensors, configs, state.

    A tensor the calibration left unchanged may be stored in its ``source`` dtype (ModelOpt saves the model's
    float32): then its values, widened, must be ModelOpt's exactly.
    """
    got, want, stored = _tensors(got_dir), _tensors(want_dir), _tensors(source)
    assert sorted(got) == sorted(want)
    different = [
        name
        for name in want
        if not _same(got[name].to(want[name].dtype), want[name])
        or got[name].dtype not in (want[name].dtype, getattr(stored.get(name), "dtype", want[name].dtype))
    ]
    assert not different, different[:5]
    assert any(name.endswith("_quantizer._amax") for name in got)
    for config in ("config.json", "generation_config.json"):
        assert json.loads((got_dir / config).read_text()) == json.loads((want_dir / config).read_text()), config
    assert _same(load_modelopt_state(got_dir), load_modelopt_state(want_dir))


@pytest.mark.parametrize(("case", "precision"), CASES)
def test_layer_by_layer_equals_modelopts_whole_model_quantization(checkpoint_factory, tmp_path, case, precision):
    """Both layer-by-layer ways: on the cached hidden states, and (every precision but AWQ's) from the shared
    statistics pass."""
    # int4 and nvfp4 need GEMM input dims in blocks of 128 / 16.
    checkpoint = checkpoint_factory(case, **(WIDE if precision.startswith(("int4", "nvfp4")) else {}))
    exclude = EXCLUDE.get((case, precision), ())
    modelopt_whole_model(checkpoint, tmp_path / "whole", precision, exclude)
    calibration = {"calib_size": SAMPLES, "calib_max_tokens": TOKENS}
    quantize_llm(checkpoint, tmp_path / "layerwise", precision=precision, exclude=exclude, **calibration)
    _assert_modelopts(tmp_path / "layerwise", tmp_path / "whole", checkpoint)
    # A VLM's vision tower (and projector) stays float: its quantizers are never calibrated, so none is saved.
    spec = family_for(read_hf_config(checkpoint))
    quantizers = [n for n in _tensors(tmp_path / "layerwise") if "_quantizer." in n]
    assert not [n for n in quantizers if any(fnmatchcase(n, pattern) for pattern in spec.quant_exclude)]
    if exclude:  # the excluded Linears hold no scale: they stay float
        scaled = {n.split(".weight_quantizer")[0] for n in _tensors(tmp_path / "whole") if ".weight_quantizer." in n}
        assert scaled and not [n for n in scaled if fnmatchcase(n, exclude[0])], scaled
    if parse_precision(precision).from_statistics:
        calibrate_llm(checkpoint, tmp_path / "statistics", **calibration)
        statistics = tmp_path / "statistics"
        quantize_llm(checkpoint, tmp_path / "shared", precision=precision, statistics_dir=statistics, exclude=exclude)
        _assert_modelopts(tmp_path / "shared", tmp_path / "whole", checkpoint)


def test_controls_another_calibration_set_or_unpropagated_states_differ(checkpoint_factory, tmp_path, monkeypatch):
    checkpoint = checkpoint_factory("qwen2")
    modelopt_whole_model(checkpoint, tmp_path / "whole", "fp8")
    want = _tensors(tmp_path / "whole")
    amax = [name for name in want if name.endswith("input_quantizer._amax") and ".layers.1." in name]

    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(f"Entirely different text, paragraph {i}: {'zebra ' * (i % 7 + 1)}" for i in range(40))
    )
    quantize_llm(
        checkpoint,
        tmp_path / "other",
        precision="fp8",
        dataset_dir=str(other),
        calib_size=SAMPLES,
        calib_max_tokens=TOKENS,
    )
    assert any(not torch.equal(_tensors(tmp_path / "other")[name], want[name]) for name in amax)
    # The same from the shared statistics of the other text.
    calibrate_llm(
        checkpoint, tmp_path / "other-stats", dataset_dir=str(other), calib_size=SAMPLES, calib_max_tokens=TOKENS
    )
    quantize_llm(checkpoint, tmp_path / "other-shared", precision="fp8", statistics_dir=tmp_path / "other-stats")
    assert any(not torch.equal(_tensors(tmp_path / "other-shared")[name], want[name]) for name in amax)
    # Statistics are read back only for the model they were taken from.
    with pytest.raises(SourceError, match="another model"):
        quantize_llm(
            checkpoint_factory("qwen3"), tmp_path / "wrong", precision="fp8", statistics_dir=tmp_path / "other-stats"
        )

    # Every layer calibrated on the embeddings (layer i's inputs never replaced by its outputs).
    real = layerwise.calibrate_stage

    def unpropagated(stage, states, config, *, next_states):
        done, _ = real(stage, states, copy.deepcopy(config), next_states=next_states)
        return done, states if next_states else None

    monkeypatch.setattr(layerwise, "calibrate_stage", unpropagated)
    quantize_llm(checkpoint, tmp_path / "stale", precision="fp8", calib_size=SAMPLES, calib_max_tokens=TOKENS)
    stale = _tensors(tmp_path / "stale")
    assert all(not torch.equal(stale[name], want[name]) for name in amax)
    layer0 = [name for name in want if name.endswith("input_quantizer._amax") and ".layers.0." in name]
    assert all(torch.equal(stale[name], want[name]) for name in layer0)  # the first layer's inputs are right


def test_a_checkpoint_written_in_shards_loads_in_transformers(checkpoint_factory, tmp_path, monkeypatch):
    """Large models are written in several shards with an index; transformers' own loader must read them back
    as the tensors quantize wrote (the tiny models of the other tests fit one file)."""
    import transformers

    from edgellm_steps.artifacts import shard_writer

    checkpoint = checkpoint_factory("qwen2")
    monkeypatch.setattr(shard_writer.ShardWriter.__init__, "__defaults__", (64 * 1024,))
    quantize_llm(checkpoint, tmp_path / "q", precision="fp8", calib_size=SAMPLES, calib_max_tokens=TOKENS)
    shards = sorted((tmp_path / "q").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert not (tmp_path / "q" / "model.safetensors").exists()
    written = _tensors(tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    state = loaded.state_dict()
    weights = [name for name in written if "_quantizer" not in name]
    assert weights and all(torch.equal(state[name], written[name]) for name in weights)
    # Control: the index is what the loader follows; a shard it names that is gone fails the load.
    shards[0].unlink()
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
