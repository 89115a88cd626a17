"""Block-FP8 releases: what their files hold, and the checks that hold at planning, from JSON and headers only.

Qwen's and DeepSeek's own ``*-FP8`` checkpoints (contract section 2.1) carry in ``config.json`` a
``quantization_config`` with ``quant_method: fp8``, ``weight_block_size: [128, 128]`` and
``activation_scheme: dynamic``. Each quantized Linear stores ``weight`` as F8_E4M3 [out, in] and
``weight_scale_inv`` as float [ceil(out/128), ceil(in/128)]; despite its name the stored value
*multiplies*: W = fp8 x weight_scale_inv over each 128 x 128 block, the last block of a row or
column cropped. Everything else (embeddings, norms, an unquantized lm_head) is in the model's float
dtype, the config's ``torch_dtype`` (``dtype`` in transformers 5), bf16 on the hub.

The classic Edge-LLM tools have no block-FP8 GEMM, so such a source is dequantized once into a
float checkpoint (``dequantize_fp8.py``) and is a float source from then on. Reading a block-FP8
source directly as float would read fp8 codes as weights, so :func:`refuse_direct_use` is what every
other step says. This module imports no torch: planning calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.checkpoint import TensorHeader, read_tensor_headers
from edgellm_steps.artifacts.safetensors_io import DTYPE_SIZES
from edgellm_steps.errors import SourceError

QUANT_METHOD = "fp8"
#: The one block size this release reads: the hub's (and transformers' default).
BLOCK = (128, 128)
WEIGHT_DTYPE = "F8_E4M3"
SCALE_SUFFIX = ".weight_scale_inv"
WEIGHT_SUFFIX = ".weight"
#: Scale dtypes read (as float32, exactly): DeepSeek's F32; BF16 / F16 as some exporters write them.
SCALE_DTYPES = ("F32", "BF16", "F16")
#: The float dtypes a dequantized checkpoint can be written in: config spelling -> safetensors dtype.
FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
#: The skip lists transformers accepts (MiniMax spells it ``ignored_layers``): recorded, not needed:
#: which Linears are quantized is read from the weights themselves.
SKIP_LISTS = ("modules_to_not_convert", "ignored_layers")
ACCEPTED = (
    "block-FP8 sources are accepted as Qwen's and DeepSeek's *-FP8 releases hold them: quantization_config "
    f"{{quant_method: fp8, weight_block_size: {list(BLOCK)}, activation_scheme: dynamic}} with F8_E4M3 weights "
    f"and float{SCALE_SUFFIX} block scales"
)


@dataclass(frozen=True)
class BlockFP8Config:
    """A block-FP8 ``quantization_config``, checked: the block and the float dtype the weights dequantize to."""

    block: tuple[int, int]
    #: The float dtype of the checkpoint's other tensors, and of the dequantized weights (``bfloat16``, ...).
    dtype: str
    #: The release's own skip list, as written (``modules_to_not_convert`` / ``ignored_layers``).
    not_converted: tuple[str, ...]
    #: The ``quantization_config`` object itself, which the dequantized config.json no longer holds.
    quantization_config: dict[str, Any]


@dataclass(frozen=True)
class BlockFP8Source:
    """A checked block-FP8 checkpoint: its config, its quantized weights and the bytes once dequantized."""

    config: BlockFP8Config
    #: Names of the F8_E4M3 weights (each with its ``weight_scale_inv``), in header order.
    quantized: tuple[str, ...]
    #: The weight bytes of the dequantized checkpoint (fp8 weights in ``dtype``, no scales).
    dequantized_bytes: int


def is_block_fp8(hf_config: dict[str, Any]) -> bool:
    """Whether ``config.json`` announces fp8 quantization (block or not: :func:`block_fp8_config` checks it)."""
    quant = hf_config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def block_fp8_config(hf_config: dict[str, Any], *, where: str = "config.json") -> BlockFP8Config | None:
    """The checked block-FP8 config of ``hf_config``; None when it is not fp8; one line for what is not accepted."""
    if not is_block_fp8(hf_config):
        return None
    quant = hf_config["quantization_config"]
    block = quant.get("weight_block_size")
    if block is None:
        raise SourceError(f"{where}: quant_method fp8 without weight_block_size (per-tensor FP8); {ACCEPTED}")
    if not isinstance(block, list | tuple) or [*block] != [*BLOCK]:
        raise SourceError(f"{where}: weight_block_size {block!r} is not accepted, only {list(BLOCK)}; {ACCEPTED}")
    scheme = quant.get("activation_scheme", "dynamic")
    if str(scheme).lower() != "dynamic":
        raise SourceError(f"{where}: activation_scheme {scheme!r} is not accepted, only 'dynamic'; {ACCEPTED}")
    for key, accepted in (("fmt", "e4m3"), ("scale_fmt", "float")):
        if quant.get(key, accepted) != accepted:
            raise SourceError(f"{where}: {key} {quant[key]!r} is not accepted, only {accepted!r}; {ACCEPTED}")
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if dtype not in FLOAT_DTYPES:
        raise SourceError(
            f"{where}: a block-FP8 release dequantizes to the config's torch_dtype (or dtype), but it is "
            f"{dtype!r}; set it to one of {', '.join(FLOAT_DTYPES)} (bfloat16 for the hub's releases)"
        )
    skipped = next((quant[key] for key in SKIP_LISTS if quant.get(key)), None) or []
    return BlockFP8Config(BLOCK, dtype, tuple(str(name) for name in skipped), dict(quant))


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The ``weight_scale_inv`` grid of an [out, in] weight: one scale per block, edge blocks cropped."""
    out_features, in_features = weight_shape
    return math.ceil(out_features / block[0]), math.ceil(in_features / block[1])


def check_block_fp8_weights(
    checkpoint: Path, config: BlockFP8Config, headers: dict[str, TensorHeader] | None = None
) -> BlockFP8Source:
    """Every F8_E4M3 tensor is a 2-D ``weight`` with a float ``weight_scale_inv`` of the block grid's shape,
    and every scale has its weight; from the shard headers alone. One line for the first that is not."""
    headers = read_tensor_headers(checkpoint) if headers is None else headers
    quantized = []
    for name, header in headers.items():
        if name.endswith(SCALE_SUFFIX):
            weight = name.removesuffix(SCALE_SUFFIX) + WEIGHT_SUFFIX
            if headers.get(weight) is None or headers[weight].dtype != WEIGHT_DTYPE:
                raise SourceError(
                    f"{checkpoint}: {name} scales no {WEIGHT_DTYPE} {weight}; the shards are incomplete or mixed: "
                    "re-download the checkpoint"
                )
            continue
        if header.dtype == "F8_E5M2" or (header.dtype == WEIGHT_DTYPE and not name.endswith(WEIGHT_SUFFIX)):
            raise SourceError(
                f"{checkpoint}: {name} is {header.dtype}, which a block-FP8 release holds only as "
                f"Linear weights in {WEIGHT_DTYPE}; {ACCEPTED}"
            )
        if header.dtype == WEIGHT_DTYPE:
            _check_scale(checkpoint, name, header, headers.get(name.removesuffix(WEIGHT_SUFFIX) + SCALE_SUFFIX), config)
            quantized.append(name)
    if not quantized:
        raise SourceError(
            f"{checkpoint}: config.json says quant_method fp8, but no weight is {WEIGHT_DTYPE}; restore the "
            "release's own config.json, or remove quantization_config from a float checkpoint"
        )
    out_size = DTYPE_SIZES[FLOAT_DTYPES[config.dtype]]
    total = 0
    for name, header in headers.items():
        count = math.prod(header.shape)
        if header.dtype == WEIGHT_DTYPE:
            total += count * out_size
        elif not name.endswith(SCALE_SUFFIX):
            total += count * DTYPE_SIZES[header.dtype]
    return BlockFP8Source(config, tuple(quantized), total)


def _check_scale(
    checkpoint: Path, name: str, header: TensorHeader, scale: TensorHeader | None, config: BlockFP8Config
) -> None:
    scale_name = name.removesuffix(WEIGHT_SUFFIX) + SCALE_SUFFIX
    if len(header.shape) != 2:
        raise SourceError(
            f"{checkpoint}: {name} is {WEIGHT_DTYPE} of shape {list(header.shape)}, not a 2-D Linear weight; {ACCEPTED}"
        )
    if scale is None:
        raise SourceError(
            f"{checkpoint}: {name} is {WEIGHT_DTYPE} but {scale_name} is missing, so its values cannot be "
            "dequantized; the shards are incomplete: re-download the checkpoint"
        )
    expected = scale_shape(header.shape, config.block)
    if scale.shape != expected or scale.dtype not in SCALE_DTYPES:
        raise SourceError(
            f"{checkpoint}: {scale_name} is {scale.dtype} {list(scale.shape)}, but a {list(header.shape)} weight in "
            f"{list(config.block)} blocks needs {'|'.join(SCALE_DTYPES)} {list(expected)}; re-download the checkpoint"
        )


def refuse_direct_use(checkpoint: Path) -> SourceError:
    """What a step says when it is given a block-FP8 release to read as it is."""
    return SourceError(
        f"{checkpoint} is a block-FP8 release (quantization_config.quant_method fp8), whose weights no step reads "
        f"as they are; dequantize it first (edgellm-dequantize-fp8 --model_dir {checkpoint} --output_dir <dir>) "
        "and give that directory, or let the workflow do it (dequantized/<model>/)"
    )
