"""The transformers model an export is verified against, for each kind of checkpoint.

- a float checkpoint: the model itself;
- a ModelOpt fake-quantized checkpoint (ours or the classic tool's): the float model, its
  quantizers restored from ``modelopt_state.pth`` read weights-only, and the calibrated
  quantizer tensors loaded from the safetensors shards. ModelOpt's own HF checkpointing
  would unpickle that file with whatever loader the environment selects; this never does;
- a GPTQ checkpoint: the float model holding the dequantized weights, (code - 8) x scale,
  so no GPTQ kernel package is needed;
- a ModelOpt unified export: ModelOpt's fake-quantized model rebuilt from the stored tensors
  (weights dequantized, quantizers set from the stored scales).

Only safetensors weights are read (``use_safetensors=True``): no pickle is ever loaded.
"""

from __future__ import annotations

from pathlib import Path

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.sources import read_hf_config
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import family_for
from edgellm_steps.quant.formats import INT4_GROUP_SIZE
from edgellm_steps.quant.gptq import gptq_codes
from edgellm_steps.quant.model_skeleton import module_name
from edgellm_steps.quant.prequantized import HeldPrecision, load_modelopt_state
from edgellm_steps.quant.recipes import modelopt_config
from edgellm_steps.quant.unified import open_tensors

_GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def _auto_class(checkpoint: Path):
    """The transformers auto class of the checkpoint's family (a VLM loads whole, vision tower included)."""
    import transformers

    return getattr(transformers, family_for(read_hf_config(checkpoint), where=str(checkpoint)).hf_auto_class)


def _float_model(checkpoint: Path, dtype):
    return _auto_class(checkpoint).from_pretrained(str(checkpoint), dtype=dtype, use_safetensors=True)


def _fake_quantized_model(checkpoint: Path, dtype):
    import modelopt.torch.opt as mto

    state = load_modelopt_state(checkpoint)
    model = mto.restore_from_modelopt_state(_float_model(checkpoint, dtype), modelopt_state=state)
    store = TensorStore(checkpoint)
    renames = family_for(read_hf_config(checkpoint), where=str(checkpoint)).hf_renames
    keys = set(model.state_dict())
    quantizers = {module_name(name, keys, renames): store.get(name) for name in store.names() if "_quantizer." in name}
    result = model.load_state_dict(quantizers, strict=False)
    if result.unexpected_keys:
        raise SourceError(
            f"{checkpoint}: quantizer tensors {result.unexpected_keys[:3]} match no quantizer of {checkpoint}/"
            "modelopt_state.pth; the state and the weights disagree: re-create the quantized checkpoint"
        )
    return model


def _model_from_tensors(checkpoint: Path, dtype, tensors: dict, what: str):
    """The float model of ``checkpoint``'s config (its quantization_config dropped) holding ``tensors``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = _auto_class(checkpoint).from_config(config, dtype=dtype)
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied:
        raise SourceError(f"{checkpoint}: {what} lacks {sorted(set(missing) - tied)[:3]}; is it whole?")
    model.tie_weights()
    return model


def _dequantized_gptq_model(checkpoint: Path, dtype, gptq: dict):
    import torch

    store = TensorStore(checkpoint)
    tensors = {}
    for name in store.names():
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            q, scales = gptq_codes(store, module, gptq)
            per_input = torch.from_numpy(scales).float().repeat_interleave(INT4_GROUP_SIZE, dim=0).t()  # [N, K]
            tensors[f"{module}.weight"] = torch.from_numpy(q).float() * per_input
        elif not name.endswith(_GPTQ_PARTS):
            tensors[name] = store.get(name)
    return _model_from_tensors(checkpoint, dtype, tensors, "GPTQ checkpoint")


def _set_buffer(module, name: str, value) -> None:
    """Set a quantizer's calibrated tensor as ModelOpt's restore does (a buffer, registered when new)."""
    if hasattr(module, name):
        getattr(module, name).data = value.clone()
    else:
        module.register_buffer(name, value.clone())


def _unified_model(checkpoint: Path, dtype, held: HeldPrecision):
    """ModelOpt's fake-quantized model of a unified export: the float model holding the weights dequantized from
    the stored codes and scales, ModelOpt's quantizers inserted by the precision's own recipe (no calibration),
    and each quantizer's amax and smoothing scale set from the stored scales (quant/unified.py).

    Every enabled quantizer must find its scale in the checkpoint and every stored scale its quantizer: a unified
    export that quantized other Linears than the recipe does is refused, not half-simulated.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    store = open_tensors(checkpoint, held)
    family = family_for(read_hf_config(checkpoint), where=str(checkpoint))
    weights = {name: store.get(name) for name in store.names() if "_quantizer." not in name}
    model = _model_from_tensors(checkpoint, dtype, weights, "unified export")
    config = modelopt_config(held.precision, family.quant_exclude)
    config["algorithm"] = None  # quantizers inserted, nothing calibrated: the stored scales are the calibration
    mtq.quantize(model, config)
    keys = {
        f"{name}.{part}"
        for name, m in model.named_modules()
        if isinstance(m, TensorQuantizer)
        for part in ("_amax", "_pre_quant_scale")
    }
    stored = {module_name(n, keys, family.hf_renames): n for n in store.names() if "_quantizer." in n}
    if unknown := sorted(set(stored) - keys):
        raise SourceError(f"{checkpoint}: scales of {unknown[:3]} match no quantizer of the {held.precision} recipe")
    for name, quantizer in model.named_modules():
        if not isinstance(quantizer, TensorQuantizer):
            continue
        if f"{name}._pre_quant_scale" in stored:
            quantizer._enable_pre_quant_scale = True
            _set_buffer(quantizer, "_pre_quant_scale", store.get(stored[f"{name}._pre_quant_scale"]))
        if f"{name}._amax" in stored:
            _set_buffer(quantizer, "_amax", store.get(stored[f"{name}._amax"]))
        elif quantizer.is_enabled:
            raise SourceError(
                f"{checkpoint}: the {held.precision} recipe quantizes {name.rpartition('.')[0]}, but the unified "
                "export stores no scale for it; the checkpoint was made with another recipe or exclusion list"
            )
    return model


def load_reference_model(checkpoint: Path, held: HeldPrecision | None, dtype):
    """The model an export of ``checkpoint`` must reproduce, in ``dtype``, in eval mode."""
    if held is None:
        model = _float_model(checkpoint, dtype)
    elif held.gptq is not None:
        model = _dequantized_gptq_model(checkpoint, dtype, held.gptq)
    elif held.unified:
        model = _unified_model(checkpoint, dtype, held).to(dtype)
    else:
        # The quantizer tensors load as stored (float32); in a float16 reference they follow the model's
        # dtype, as the graph stores its scales, and SmoothQuant's scaled input stays float16.
        model = _fake_quantized_model(checkpoint, dtype).to(dtype)
    return model.eval()
