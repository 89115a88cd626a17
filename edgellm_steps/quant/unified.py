"""ModelOpt's unified HF export (NVIDIA's ``*-FP8`` / ``*-NVFP4`` / ``*-AWQ`` hub releases), read as stored.

A unified export keeps each quantized Linear's real low-precision ``weight`` with plain-multiplier
scales beside it (contract 2.1): ``weight_scale``, ``input_scale``, ``weight_scale_2``,
``pre_quant_scale``, and ``k_scale`` / ``v_scale`` for an FP8 KV cache. :class:`UnifiedStore`
presents such a checkpoint under the names of the fake-quantized layout the exporter and the
verify reference already read: the ``weight`` dequantized exactly (codes x scales, float32),
``<module>.weight_quantizer._amax`` = weight scale x the format's largest code,
``input_quantizer._amax`` likewise from ``input_scale``, ``input_quantizer._pre_quant_scale``,
and ``<attention>.{k,v}_bmm_quantizer._amax`` = scale x 448 (1.0 x 448 when the export wrote no
scale, as ModelOpt 0.43+ does). The exporter quantizes those float32 weights with those amax values
and so gets back exactly the stored codes (each code x scale / scale rounds to itself); NVFP4 is
not re-derived at all: its stored codes and E4M3 block scales go into the graph byte for byte
(:meth:`UnifiedStore.fp4_blocks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import SourceError
from edgellm_steps.quant.formats import (
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    INT4_GROUP_SIZE,
    INT4_MAX,
    INT8_MAX,
    NVFP4_BLOCK_SIZE,
)
from edgellm_steps.quant.prequantized import HeldPrecision

if TYPE_CHECKING:  # planning imports this module for the layout table: torch only where tensors are read
    import torch

WEIGHT_SCALE, WEIGHT_SCALE_2, INPUT_SCALE, PRE_QUANT_SCALE = (
    "weight_scale",
    "weight_scale_2",
    "input_scale",
    "pre_quant_scale",
)
#: The tensors a unified export adds beside a quantized Linear's ``weight``, and the KV-cache scales.
SCALE_SUFFIXES = (WEIGHT_SCALE, WEIGHT_SCALE_2, INPUT_SCALE, PRE_QUANT_SCALE, "k_scale", "v_scale")
KV_SCALES = {"k": ("k_proj", "k_scale"), "v": ("v_proj", "v_scale")}


@dataclass(frozen=True)
class UnifiedLayout:
    """How one weight format is stored in a unified export (contract 2.1)."""

    #: safetensors dtype of the stored ``weight``.
    weight_dtype: str
    #: amax = scale x bound: the largest code (for NVFP4's two-level scale, 6 x 448 of ``weight_scale_2``).
    bound: float
    #: Whether activations carry a calibrated ``input_scale``.
    input_scale: bool
    #: How the codes of a [out, in] weight are stored: (rows divisor, columns divisor) of the packing.
    packing: tuple[int, int]
    #: The ``weight_scale`` shape of a [out, in] weight (per-tensor scales may be [] or [1]).
    scale_shape: Callable[[int, int], tuple[int, ...]]
    #: Bytes of the float16 model per byte of stored weights (verify holds the model dequantized).
    expansion: int

    def stored_shape(self, out: int, fan_in: int) -> tuple[int, int]:
        return out // self.packing[0], fan_in // self.packing[1]


#: Per weight format of the format table: its unified layout.
LAYOUTS = {
    "fp8": UnifiedLayout("F8_E4M3", FP8_E4M3_MAX, True, (1, 1), lambda out, fan_in: (), 2),
    "int8_sq": UnifiedLayout("I8", INT8_MAX, True, (1, 1), lambda out, fan_in: (out,), 2),
    "int4_awq": UnifiedLayout("U8", INT4_MAX, False, (2, 1), lambda out, fan_in: (out, fan_in // INT4_GROUP_SIZE), 4),
    "nvfp4": UnifiedLayout(
        "U8", FP4_E2M1_MAX * FP8_E4M3_MAX, True, (1, 2), lambda out, fan_in: (out, fan_in // NVFP4_BLOCK_SIZE), 4
    ),
}

#: E2M1 magnitudes by the low three bits of a code; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _scalar(tensor: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    """A per-tensor scale, stored as shape [] or [1]; read as float32 of shape []."""
    if tensor.numel() != 1:
        raise SourceError(f"{where}: {name} has shape {list(tensor.shape)}, expected a single value ([] or [1])")
    return tensor.float().reshape(())


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's W4A16_AWQ bytes [out/2, in] -> signed codes [out, in]: row 2r in the low nibble, 2r+1 high."""
    import torch

    low, high = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
    codes = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 bytes [out, in/2] -> E2M1 values [out, in] (float32): element 2i in the low nibble."""
    import torch

    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    sign = torch.where(nibbles >= 8, -1.0, 1.0)
    return sign * torch.tensor(E2M1_VALUES)[nibbles & 0x07]


class UnifiedStore:
    """A unified export's tensors under the fake-quantized layout's names (see the module docstring).

    It answers what :class:`~edgellm_steps.artifacts.checkpoint.TensorStore` answers (``names``,
    ``get``, ``shape``, ``row_chunks``), so the exporter, the planner's checks and the verify reference
    read it as they read a fake-quantized checkpoint.
    """

    def __init__(self, store: TensorStore, weights: str, kv_fp8: bool) -> None:
        self.checkpoint = store.checkpoint
        self.raw = store
        self.layout = LAYOUTS[weights]
        self.weights = weights
        #: Quantized Linears: those with a ``weight_scale`` beside their ``weight``.
        self.quantized = [n.removesuffix(f".{WEIGHT_SCALE}") for n in store.names() if n.endswith(f".{WEIGHT_SCALE}")]
        self._derived: dict[str, Callable[[], torch.Tensor]] = {}
        for module in self.quantized:
            self._check_linear(module)
            self._derived[f"{module}.weight_quantizer._amax"] = lambda m=module: self._weight_amax(m)
            if self.layout.input_scale:
                self._derived[f"{module}.input_quantizer._amax"] = lambda m=module: self._input_amax(m)
            if f"{module}.{PRE_QUANT_SCALE}" in store:
                name = f"{module}.input_quantizer._pre_quant_scale"
                self._derived[name] = lambda m=module: store.get(f"{m}.{PRE_QUANT_SCALE}").float()
        if kv_fp8:
            for attention in sorted({m.rpartition(".")[0] for m in self.quantized if m.endswith(".k_proj")}):
                for kv, (proj, scale) in KV_SCALES.items():
                    name = f"{attention}.{proj}.{scale}"
                    self._derived[f"{attention}.{kv}_bmm_quantizer._amax"] = lambda n=name: self._kv_amax(n)
        hidden = {f"{m}.{s}" for m in self.quantized for s in SCALE_SUFFIXES} | {
            n for n in store.names() if n.endswith((".k_scale", ".v_scale"))
        }
        self._names = [n for n in store.names() if n not in hidden] + list(self._derived)
        self._known = set(self._names)

    # the fake-quantized layout's view

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name.removesuffix(".weight") in self.quantized and name.endswith(".weight"):
            return tuple(self.dequantized(name.removesuffix(".weight")).shape)
        if name in self._derived:
            return tuple(self._derived[name]().shape)
        return self.raw.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name.endswith(".weight") and name.removesuffix(".weight") in self.quantized:
            return self.dequantized(name.removesuffix(".weight"))
        if name in self._derived:
            return self._derived[name]()
        return self.raw.get(name)

    def reading_ahead(self) -> contextlib.AbstractContextManager[None]:
        return self.raw.reading_ahead()

    def read_ahead(self, prefix: str) -> None:
        """The stored tensors under ``prefix`` (codes and scales), read ahead by the raw store."""
        self.raw.read_ahead(prefix)

    def row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        if name.endswith(".weight") and name.removesuffix(".weight") in self.quantized:
            return iter(self.dequantized(name.removesuffix(".weight")).split(rows))
        return self.raw.row_chunks(name, rows)

    # the stored tensors

    def _weight_scale(self, module: str) -> torch.Tensor:
        """The scale the codes are multiplied by (NVFP4: the second level, ``weight_scale_2``)."""
        if self.weights == "nvfp4":
            return _scalar(self.raw.get(f"{module}.{WEIGHT_SCALE_2}"), f"{module}.{WEIGHT_SCALE_2}", self.checkpoint)
        scale = self.raw.get(f"{module}.{WEIGHT_SCALE}").float()
        return _scalar(scale, f"{module}.{WEIGHT_SCALE}", self.checkpoint) if self.weights == "fp8" else scale

    def _weight_amax(self, module: str) -> torch.Tensor:
        """In the fake-quantized layout's shape: [] per tensor, [out, 1] per channel, [out * in/128, 1] per block."""
        amax = self._weight_scale(module) * self.layout.bound
        return amax if amax.dim() == 0 else amax.reshape(-1, 1)

    def _input_amax(self, module: str) -> torch.Tensor:
        name = f"{module}.{INPUT_SCALE}"
        if name not in self.raw:
            raise SourceError(
                f"{self.checkpoint}: {module} has no {INPUT_SCALE}; a {self.weights} unified export calibrates every "
                "quantized Linear's activations (a weight-only variant is not supported); re-export it with ModelOpt"
            )
        return _scalar(self.raw.get(name), name, self.checkpoint) * self.layout.bound

    def _kv_amax(self, name: str) -> torch.Tensor:
        """A KV scale x 448; a scale the export did not write means 1.0 (ModelOpt 0.43+ writes none)."""
        if name not in self.raw:
            import torch

            return torch.tensor(FP8_E4M3_MAX)
        return _scalar(self.raw.get(name), name, self.checkpoint) * FP8_E4M3_MAX

    def _check_linear(self, module: str) -> None:
        """The stored weight must have the format's dtype (a mixed checkpoint is not one precision)."""
        dtype = self.raw.dtype(f"{module}.weight")
        if dtype != self.layout.weight_dtype:
            raise SourceError(
                f"{self.checkpoint}: {module}.weight is {dtype}, but a {self.weights} unified export stores "
                f"{self.layout.weight_dtype}; the checkpoint mixes formats: re-export it with one quant_algo"
            )

    def dequantized(self, module: str) -> torch.Tensor:
        """The Linear's weight [out, in] as the stored codes x scales, in float32 (contract 2.1's last column)."""
        codes = self.raw.get(f"{module}.weight")
        scale = self.raw.get(f"{module}.{WEIGHT_SCALE}")
        if self.weights == "fp8":
            return codes.float() * _scalar(scale, f"{module}.{WEIGHT_SCALE}", self.checkpoint)
        if self.weights == "int8_sq":
            return codes.float() * scale.float().reshape(-1, 1)
        if self.weights == "int4_awq":
            per_block = scale.float().repeat_interleave(INT4_GROUP_SIZE, dim=1)
            return unpack_awq(codes).float() * per_block
        import torch

        blocks = scale.view(torch.float8_e4m3fn).float().repeat_interleave(NVFP4_BLOCK_SIZE, dim=1)
        return unpack_fp4(codes) * (blocks * self._weight_scale(module))  # per-block scale first, as the graph

    def fp4_blocks(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An NVFP4 Linear as stored: packed codes U8 [out, in/2], E4M3 block scales as bytes [out, in/16],
        and the float32 second-level scale; the graph's FP4 weight takes them byte for byte."""
        import torch

        block_scales = self.raw.get(f"{module}.{WEIGHT_SCALE}")
        return self.raw.get(f"{module}.weight"), block_scales.view(torch.uint8), self._weight_scale(module)


def open_tensors(checkpoint: Path, held: HeldPrecision | None) -> TensorStore | UnifiedStore:
    """The checkpoint's tensors as the exporter reads them: a unified export through :class:`UnifiedStore`."""
    store = TensorStore(checkpoint)
    if held is None or not held.unified:
        return store
    return UnifiedStore(store, held.precision.weights, held.precision.kv_cache == "fp8")
