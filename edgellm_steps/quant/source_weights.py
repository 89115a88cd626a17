"""A checkpoint's weights checked against its ``config.json`` and its quantization record, from headers only.

A ``config.json`` that disagrees with the weights (``intermediate_size`` 512 over 256-wide
projections, one layer too many) otherwise surfaces as a transformers traceback deep inside
quantize-llm, or as a graph built with the config's shapes around weights of others. A record
that says the checkpoint is quantized while no Linear carries a quantizer scale would be
exported as that precision with no quantization in the graph. Both are plain facts of the
shard headers, so planning refuses them before any job runs, and every step that opens the
checkpoint refuses them the same way.
"""

from __future__ import annotations

from pathlib import Path

from edgellm_steps.artifacts.checkpoint import DecoderDims, TensorHeader, read_tensor_headers
from edgellm_steps.errors import SourceError
from edgellm_steps.models.families import FamilySpec
from edgellm_steps.quant.formats import FLOAT_WEIGHTS
from edgellm_steps.quant.prequantized import HeldPrecision
from edgellm_steps.quant.unified import LAYOUTS, WEIGHT_SCALE

#: What ModelOpt's fake-quantized layout stores beside each quantized Linear's weight.
WEIGHT_AMAX = "weight_quantizer._amax"


def _expect(headers: dict[str, TensorHeader], name: str, shape: tuple[int, ...], config_says: str) -> None:
    found = headers.get(name)
    if found is None:
        raise SourceError(f"the weights lack {name}, which config.json implies; is the checkpoint complete?")
    if found.shape != shape:
        raise SourceError(
            f"config.json says {config_says}, so {name} should be {list(shape)}, but {found.shard.name} holds "
            f"{list(found.shape)}; the config does not belong to these weights: restore the checkpoint's own "
            "config.json"
        )


def check_source_weights(checkpoint: Path, spec: FamilySpec, dims: DecoderDims, held: HeldPrecision | None) -> None:
    """Refuse in one line weights whose headers disagree with ``dims`` or with the precision ``held`` names."""
    headers = read_tensor_headers(checkpoint)
    spec = spec.resolved(headers)
    h = dims.hidden_size
    _expect(headers, spec.embed_tokens, (dims.vocab_size, h), f"vocab_size {dims.vocab_size} x hidden_size {h}")
    last = spec.layer_prefix.format(i=dims.num_layers - 1)
    _expect(headers, f"{last}.input_layernorm.weight", (h,), f"{dims.num_layers} layers of hidden_size {h}")
    beyond = f"{spec.layer_prefix.format(i=dims.num_layers)}.input_layernorm.weight"
    if beyond in headers:
        raise SourceError(
            f"config.json says num_hidden_layers {dims.num_layers}, but the weights hold {beyond} too; "
            "the config does not belong to these weights: restore the checkpoint's own config.json"
        )
    if held is not None and held.gptq is not None:
        return  # GPTQ packs its weights (qweight); gptq.py checks that layout against the config
    linears = spec.linear_shapes(dims)
    if held is not None and held.unified:
        _check_unified(headers, linears, dims, held)
        return
    for module, (fan_in, fan_out) in linears.items():
        _expect(headers, f"{module}.weight", (fan_out, fan_in), _linear_words(module, dims))
    quantized = held is not None and held.precision.weights != FLOAT_WEIGHTS
    if quantized and not any(f"{module}.{WEIGHT_AMAX}" in headers for module in linears):
        raise SourceError(
            f"{held.origin} says the weights are {held.precision}, but no decoder Linear carries a quantizer "
            f"scale ({WEIGHT_AMAX}), so nothing in it is quantized; re-run the quantize step, or give the "
            "unquantized checkpoint"
        )


def _linear_words(module: str, dims: DecoderDims) -> str:
    """What in config.json decides a Linear's shape, for the message."""
    if module.endswith(("gate_proj", "up_proj", "gate_up_proj", "down_proj")):
        return f"hidden_size {dims.hidden_size} and intermediate_size {dims.intermediate_size}"
    return (
        f"hidden_size {dims.hidden_size}, {dims.num_heads} heads and {dims.num_kv_heads} KV heads of head_dim "
        f"{dims.head_dim}"
    )


def _check_unified(headers: dict[str, TensorHeader], linears: dict, dims: DecoderDims, held: HeldPrecision) -> None:
    """A unified export's Linears: stored codes in the format's dtype and packing, scales of the format's shape.

    A Linear without ``weight_scale`` is float (an excluded module); at least one must be quantized.
    """
    layout = LAYOUTS[held.precision.weights]
    quantized = 0
    for module, (fan_in, fan_out) in linears.items():
        scale = headers.get(f"{module}.{WEIGHT_SCALE}")
        if scale is None:
            _expect(headers, f"{module}.weight", (fan_out, fan_in), _linear_words(module, dims))
            continue
        quantized += 1
        stored = layout.stored_shape(fan_out, fan_in)
        _expect(
            headers, f"{module}.weight", stored, f"{_linear_words(module, dims)} ({held.precision.weights} packing)"
        )
        weight = headers[f"{module}.weight"]
        if weight.dtype != layout.weight_dtype:
            raise SourceError(
                f"{weight.shard.name}: {module}.weight is {weight.dtype}, but a {held.precision.weights} unified "
                f"export stores {layout.weight_dtype}; the checkpoint mixes formats: re-export it with one quant_algo"
            )
        expected = layout.scale_shape(fan_out, fan_in)
        if scale.shape != expected and not (expected == () and scale.shape == (1,)):
            raise SourceError(
                f"{scale.shard.name}: {module}.{WEIGHT_SCALE} is {list(scale.shape)}, but {held.precision.weights} "
                f"stores {list(expected)} for a [{fan_out}, {fan_in}] weight; re-export the checkpoint with ModelOpt"
            )
    if not quantized:
        raise SourceError(
            f"{held.origin} says the weights are {held.precision}, but no decoder Linear carries a {WEIGHT_SCALE}, "
            "so nothing in it is quantized; give the unquantized checkpoint, or re-export it with ModelOpt"
        )
