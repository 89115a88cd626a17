"""ModelOpt unified HF checkpoints for tests, written and read by ModelOpt's own code.

NVIDIA's hub ``*-FP8`` / ``*-NVFP4`` / ``*-AWQ`` checkpoints come from ModelOpt's unified export
(``modelopt.torch.export.export_hf_checkpoint``): real low-precision weights with scales, no
``modelopt_state.pth``. To test a reader of that layout without the network, we make one from a
fake-quantized checkpoint of ours: restore the calibrated model and let ModelOpt export it. The
writer is ModelOpt's, so the test fixture cannot share a misreading with the code under test.

:func:`modelopt_dequantized_weight` is the matching reader, again ModelOpt's code where it has one:
a reference the project's own dequantization is compared with.

Export runs on the CPU with transformers 5.23 for every precision we make (fp8, fp8-kvfp8,
fp8-lmfp8, nvfp4, nvfp4-kvfp8, int4_awq, int8_sq) without any patch: ModelOpt's packers
(``to_quantized_weight``, ``NVFP4QTensor.quantize``, ``pack_int4_in_uint8``) are plain torch on the CPU,
and the probe forward it runs to find siblings disables every quantizer.

Before packing, ModelOpt rewrites the model the way every hub checkpoint was rewritten
(``requantize_resmooth_fused_llm_layers``): siblings sharing an input (q/k/v, gate/up) get one
averaged ``pre_quant_scale`` (weights rescaled, per-block amax recalibrated) and, for per-tensor
weight scales (NVFP4's ``weight_scale_2``, not FP8), one max amax; for AWQ that shared scale is then
folded into the preceding RMSNorm. So the exported weights equal the fake model's quantized weights
only after that same rewrite (:func:`fused_fake_model`), not always the model as calibrated.

Even then the export is not the fake quantizer bit for bit, and a test's bound must allow it: the
fake quantizer rounds ``w * (max / amax)``, the export ``w / (amax / max)``, so a few elements in
10^4 (INT8, INT4) land one code apart; and FP8 divides the weight cast to the export dtype by a 0-d
float32 scale, which stays in bf16, so rounding twice moves ~3% of FP8 codes by one step. NVFP4
matches the float32 fake quantizer exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

#: Copied byte for byte from the fake-quantized checkpoint (its own copies of the source's).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)

#: ``hf_quant_config.json`` ``quant_algo`` -> ModelOpt's internal format name (``export/model_config.py``).
_MODELOPT_FORMAT = {
    "FP8": "fp8",
    "W8A8_SQ_PER_CHANNEL": "int8_sq",
    "W4A16_AWQ": "int4_awq",
    "NVFP4": "nvfp4",
}


def restored_fake_model(fake_dir: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The calibrated fake-quantized model of ``fake_dir``, restored as the verifier restores it."""
    from edgellm_steps.quant.prequantized import held_precision
    from edgellm_steps.verify.reference_models import load_reference_model

    return load_reference_model(fake_dir, held_precision(fake_dir, {}), dtype)


def fused_fake_model(fake_dir: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The restored model after ModelOpt's pre-export rewrite of siblings: what the export packs."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    model = restored_fake_model(fake_dir, dtype)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def write_unified(fake_dir: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ModelOpt's unified HF export of the fake-quantized checkpoint ``fake_dir`` into ``out_dir``.

    ``dtype`` is the model's dtype during export and that of every unquantized tensor written
    (embeddings, norms, biases, an excluded lm_head, ``pre_quant_scale``), as on the hub (bf16).
    Note that the restore casts the calibrated amaxes to ``dtype`` too, so scales derive from
    ``dtype``-rounded amaxes. The tokenizer files are copied, not re-saved (contract 2: a re-save can
    change ``tokenizer.json``); ``generation_config.json`` replaces the one ``save_pretrained`` writes.
    """
    from modelopt.torch.export import export_hf_checkpoint

    model = restored_fake_model(fake_dir, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_hf_checkpoint(model, dtype=dtype, export_dir=out_dir, save_modelopt_state=False)
    for name in TOKENIZER_FILES:
        if (fake_dir / name).is_file():
            shutil.copyfile(fake_dir / name, out_dir / name)
    if (out_dir / "modelopt_state.pth").exists():
        raise AssertionError(f"{out_dir}: ModelOpt's unified export left a modelopt_state.pth")
    return out_dir


def _awq_codes(packed: torch.Tensor) -> torch.Tensor:
    """U8 [out/2, in] -> int8 codes [out, in]: the inverse of ModelOpt's ``pack_int4_in_uint8``.

    ModelOpt has no unpacker for this layout (``INT4QTensor.dequantize`` reads its own layout:
    packed along ``in``, high nibble first, reciprocal scales), so these few lines undo
    ``pack_int4_in_uint8``: row 2r in the low nibble, row 2r+1 in the high one, two's complement.
    """
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    rows = torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])  # [out, in], row 2r then 2r+1
    return torch.where(rows > 7, rows - 16, rows)


def modelopt_dequantized_weight(tensors: dict[str, torch.Tensor], module: str, quant_algo: str) -> torch.Tensor:
    """The float32 weight [out, in] of Linear ``module`` of a unified checkpoint, dequantized by ModelOpt.

    ``tensors`` holds the checkpoint's tensors by name, ``quant_algo`` is ``hf_quant_config.json``'s.
    FP8 and INT8 go through ``from_quantized_weight`` (the export's own inverse), NVFP4 through
    ``NVFP4QTensor.dequantize``; AWQ's codes are unpacked by :func:`_awq_codes` (ModelOpt has no
    unpacker for its export layout) and scaled per 128-column block by ``INT8QTensor.dequantize``.
    """
    from modelopt.torch.export.quant_utils import from_quantized_weight
    from modelopt.torch.quantization.qtensor import INT8QTensor, NVFP4QTensor

    fmt = _MODELOPT_FORMAT.get(quant_algo)
    weight, scale = tensors[f"{module}.weight"], tensors.get(f"{module}.weight_scale")
    if scale is None or weight.element_size() >= 2:
        return weight.float()  # not quantized (an excluded module)
    if fmt in ("fp8", "int8_sq"):
        return from_quantized_weight(weight, scale.float(), fmt, torch.float32).float()
    if fmt == "nvfp4":
        shape = torch.Size([weight.shape[0], weight.shape[1] * 2])
        qtensor = NVFP4QTensor(shape, torch.float32, weight)
        double_scale = tensors[f"{module}.weight_scale_2"].float()
        return qtensor.dequantize(dtype=torch.float32, scale=scale, double_scale=double_scale, block_sizes={-1: 16})
    if fmt == "int4_awq":
        codes = _awq_codes(weight)
        block = codes.shape[1] // scale.shape[1]
        return INT8QTensor(codes.shape, torch.float32, codes).dequantize(
            dtype=torch.float32, scale=scale.float(), block_sizes={-1: block}
        )
    raise NotImplementedError(f"quant_algo {quant_algo!r}: expected one of {sorted(_MODELOPT_FORMAT)}")
