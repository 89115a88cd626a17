"""Checkpoints that arrive already quantized, and the one precision each can be exported as.

A checkpoint that holds a precision of its own is never read as fp16 and never
quantized again (contract section 2). Accepted layouts:

- this project's quantize step output: ``edgellm_quantization.json`` names the precision;
- ModelOpt's fake-quantized layout, as the classic quantize-llm writes it (float weights,
  ``*_quantizer._amax`` / ``_pre_quant_scale`` tensors, ``modelopt_state.pth``):
  ``hf_quant_config.json`` names it. It is the layout our own quantize step writes, so the
  export reads it the same way;
- ModelOpt's unified export (NVIDIA's hub ``*-FP8`` / ``*-NVFP4`` / ``*-AWQ`` releases: real
  low-precision weights with ``weight_scale`` tensors, no ``modelopt_state.pth``) for the
  ``quant_algo`` values of :data:`UNIFIED_ALGOS`: ``hf_quant_config.json`` (or, without it,
  ``config.json``'s ``quantization_config``) names it; ``quant/unified.py`` reads its tensors;
- GPTQ (``quantization_config.quant_method: gptq`` in ``config.json``): ``int4_gptq``;
- block-FP8 releases, only through the dequantize job (``quant/block_fp8.py``).

Everything else that announces quantization is refused with the list above: other
``quantization_config`` methods (AutoAWQ's ``awq``, ``compressed-tensors``, ``bitsandbytes``),
another ``quant_algo``, and a ``modelopt_state.pth`` that no record explains. This module reads
JSON only (planning imports it and must stay light); :func:`load_modelopt_state` is the one place
that opens ``modelopt_state.pth``, with a weights-only load no environment variable can turn off.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.errors import PrecisionError, SourceError
from edgellm_steps.quant.block_fp8 import block_fp8_config, refuse_direct_use
from edgellm_steps.quant.formats import FORMATS, formats_for, held_format
from edgellm_steps.quant.gptq import gptq_config
from edgellm_steps.quant.precision import Precision, parse_precision

#: The quantize step's record of the precision it wrote.
QUANT_INFO = "edgellm_quantization.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
MODELOPT_STATE = "modelopt_state.pth"


def _algos(role: str) -> dict[str, str]:
    """``hf_quant_config.json`` spelling -> format name, for the formats the grammar admits in ``role``."""
    return {FORMATS[name].hf_quant_algo: name for name in formats_for(role) if FORMATS[name].hf_quant_algo}


#: ``quant_algo`` of ``hf_quant_config.json`` -> weight format of the fake-quantized layout.
WEIGHT_ALGOS = _algos("weights")
#: ``kv_cache_quant_algo`` -> KV-cache format.
KV_ALGOS = _algos("kv_cache")
#: LM-head formats by their ``quant_algo`` spelling (``quantized_layers.lm_head``).
LM_HEAD_ALGOS = _algos("lm_head")
#: The format a GPTQ checkpoint holds (``quantization_config.quant_method: gptq``).
GPTQ = held_format("gptq")
LM_HEAD_MODULE = "lm_head"

#: ``quant_algo`` of a unified export -> weight format: the formats whose stored tensors the exporter reads.
UNIFIED_ALGOS = WEIGHT_ALGOS

SUPPORTED = (
    "supported pre-quantized sources: ModelOpt checkpoints with hf_quant_config.json quant_algo "
    f"{'|'.join(WEIGHT_ALGOS)} (kv_cache_quant_algo FP8 or null), fake-quantized (with modelopt_state.pth, as "
    "quantize-llm writes them) or ModelOpt's unified export (real low-precision weights, as NVIDIA's hub releases); "
    f"this project's quantized checkpoints; GPTQ ({GPTQ.name}); block-FP8 releases (quant_method fp8, "
    "dequantized by the workflow)"
)


@dataclass(frozen=True)
class HeldPrecision:
    """The precision a pre-quantized checkpoint holds, and the file that says so."""

    precision: Precision
    origin: str
    #: GPTQ's quantization config, for GPTQ checkpoints.
    gptq: dict[str, Any] | None = None
    #: A ModelOpt unified export (stored low-precision weights with scales, read by quant/unified.py).
    unified: bool = False


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path} is not valid JSON ({err}); repair or re-download it") from err
    if not isinstance(data, dict):
        raise SourceError(f"{path} holds a JSON {type(data).__name__}, not an object; repair or re-download it")
    return data


def _lm_head_format(quant: dict[str, Any], weights: str, path: Path) -> str | None:
    """The lm_head's format: excluded -> None; stated in ``quantized_layers``; else the weights' format."""
    excluded = quant.get("exclude_modules") or []
    if any(fnmatch.fnmatchcase(LM_HEAD_MODULE, str(pattern)) for pattern in excluded):
        return None
    stated = (quant.get("quantized_layers") or {}).get(LM_HEAD_MODULE)
    if isinstance(stated, dict) and stated.get("quant_algo") in LM_HEAD_ALGOS:
        return LM_HEAD_ALGOS[stated["quant_algo"]]
    if weights in LM_HEAD_ALGOS.values():
        return weights
    raise SourceError(
        f"{path}: lm_head is not in exclude_modules, so it is quantized, but the file does not say in which format; "
        "add lm_head to exclude_modules or quantized_layers.lm_head.quant_algo (FP8|NVFP4)"
    )


def _config_quantization(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` of a ModelOpt export in hf_quant_config.json's terms.

    ModelOpt 0.30+ writes it beside hf_quant_config.json: ``ignore`` for ``exclude_modules``, and the KV
    cache as ``kv_cache_scheme`` ({"num_bits": 8, "type": "float"} is FP8) instead of ``kv_cache_quant_algo``.
    """
    quant = dict(hf_config.get("quantization_config") or {})
    scheme = quant.get("kv_cache_scheme")
    if "kv_cache_quant_algo" not in quant and isinstance(scheme, dict):
        fp8 = scheme.get("num_bits") == 8 and scheme.get("type") == "float"
        quant["kv_cache_quant_algo"] = "FP8" if fp8 else f"{scheme.get('type')}{scheme.get('num_bits')}"
    quant.setdefault("exclude_modules", quant.get("ignore") or [])
    return quant


def _from_modelopt(checkpoint: Path, quant: Any, path: Path) -> HeldPrecision:
    """The precision a ModelOpt checkpoint holds: fake-quantized with its state, or a unified export without."""
    if not isinstance(quant, dict):
        raise SourceError(f"{path} has no 'quantization' object; repair or re-download it")
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo not in WEIGHT_ALGOS:
        raise SourceError(f"{path}: quant_algo {algo!r} is not supported; {SUPPORTED}")
    if kv_algo is not None and kv_algo not in KV_ALGOS:
        raise SourceError(f"{path}: kv_cache_quant_algo {kv_algo!r} is not supported (only FP8 or null)")
    weights = WEIGHT_ALGOS[algo]
    precision = Precision(weights, _lm_head_format(quant, weights, path), KV_ALGOS.get(kv_algo))
    if (checkpoint / MODELOPT_STATE).is_file():
        return HeldPrecision(precision, path.name)
    return HeldPrecision(precision, f"{path.name}, ModelOpt unified export", unified=True)


def held_precision(checkpoint: Path, hf_config: dict[str, Any]) -> HeldPrecision | None:
    """The precision ``checkpoint`` already holds, None for a plain float checkpoint; refuses unknown layouts."""
    checkpoint = Path(checkpoint)
    if block_fp8_config(hf_config, where=str(checkpoint / "config.json")) is not None:
        raise refuse_direct_use(checkpoint)  # read only through its dequantized checkpoint (block_fp8.py)
    gptq = gptq_config(hf_config)
    if gptq is not None:
        return HeldPrecision(Precision(GPTQ.name), "config.json quantization_config", gptq)
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method not in (None, "modelopt"):
        raise SourceError(f"{checkpoint}: quantization_config.quant_method {method!r} is not supported; {SUPPORTED}")
    if (checkpoint / QUANT_INFO).is_file():
        record = _json_object(checkpoint / QUANT_INFO)
        try:
            return HeldPrecision(parse_precision(str(record.get("precision"))), QUANT_INFO)
        except PrecisionError as err:
            raise SourceError(f"{checkpoint / QUANT_INFO}: {err}; re-run the quantize step") from err
    if (checkpoint / HF_QUANT_CONFIG).is_file():
        path = checkpoint / HF_QUANT_CONFIG
        return _from_modelopt(checkpoint, _json_object(path).get("quantization"), path)
    if method == "modelopt":
        return _from_modelopt(checkpoint, _config_quantization(hf_config), checkpoint / "config.json")
    if (checkpoint / MODELOPT_STATE).is_file():
        raise SourceError(
            f"{checkpoint} carries {MODELOPT_STATE} but no {HF_QUANT_CONFIG} naming its precision, so its weights "
            f"cannot be read as fp16 nor as a known precision; add {HF_QUANT_CONFIG} or use the unquantized checkpoint"
        )
    return None


def load_modelopt_state(checkpoint: Path) -> dict[str, Any]:
    """``modelopt_state.pth`` through torch's weights-only unpickler: plain data, never code.

    ``weights_only=True`` is passed explicitly: torch lets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    override only a call that leaves it unset, so no environment variable can turn this off.
    """
    import pickle

    import torch

    path = Path(checkpoint) / MODELOPT_STATE
    if not path.is_file():
        raise SourceError(f"{checkpoint} has no {MODELOPT_STATE}; it is not a ModelOpt fake-quantized checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(
            f"{path} is not a plain-data ModelOpt state (refused by the weights-only loader: {reason}); "
            "re-create the checkpoint with ModelOpt or quantize-llm"
        ) from err
    if not isinstance(state, dict) or "modelopt_state_dict" not in state:
        raise SourceError(f"{path} holds no ModelOpt state; re-create the checkpoint with ModelOpt or quantize-llm")
    return state
