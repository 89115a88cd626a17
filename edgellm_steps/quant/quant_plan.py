"""Which format each Linear and the KV cache of an export get, from the precision a checkpoint holds.

:class:`QuantPlan` reads only the quantizer tensors' presence and the precision record; turning a
Linear into ONNX in its format is the exporter's job (``export/quantized_linear.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.errors import SourceError
from edgellm_steps.quant.formats import FLOAT_WEIGHTS, FORMATS, FP8_E4M3_MAX
from edgellm_steps.quant.precision import Precision
from edgellm_steps.quant.prequantized import HeldPrecision


@dataclass(frozen=True)
class QuantPlan:
    """Which format each Linear and the KV cache get, from the precision the checkpoint holds."""

    weights: str | None = None
    lm_head: str | None = None
    kv_cache: str | None = None
    lm_head_module: str = "lm_head"
    #: The checkpoint's GPTQ quantization config when it is a pre-quantized GPTQ checkpoint.
    gptq: dict | None = None

    @classmethod
    def from_held(cls, held: HeldPrecision | None, lm_head_module: str) -> QuantPlan:
        """The plan for a checkpoint holding ``held`` (None: a float checkpoint, exported as fp16)."""
        if held is None:
            return cls(lm_head_module=lm_head_module)
        precision = held.precision
        weights = None if precision.weights == FLOAT_WEIGHTS else precision.weights
        return cls(weights, precision.lm_head, precision.kv_cache, lm_head_module, held.gptq)

    def check_tensors(self, store: TensorStore, where: str) -> None:
        """The checkpoint's quantizer tensors must be the ones its precision record promises."""
        calibrated = f"{self.lm_head_module}.weight_quantizer._amax" in store
        if calibrated != bool(self.lm_head):
            state = "carries" if calibrated else "lacks"
            raise SourceError(
                f"{where}: the lm_head {state} calibrated quantizer tensors, but the precision record says "
                f"{self.precision}; the record and the weights disagree: re-create the quantized checkpoint"
            )
        if any(name.endswith(".weight_scale") for name in store.names()):
            raise SourceError(
                f"{where} holds real low-precision weights (weight_scale tensors, a ModelOpt unified export), which "
                "this release does not read; give the unquantized checkpoint to quantize here"
            )

    @property
    def opset(self) -> int:
        """The highest opset a format of the graph needs (FP4 tensors: 23; otherwise the contract's 19)."""
        return max(FORMATS[fmt].onnx_opset for fmt in self.as_precision().formats())

    @property
    def kv_elem_type(self) -> int:
        """The ONNX element type of the KV cache: the KV format's, float16 without one."""
        import onnx

        dtype = FORMATS[self.kv_cache].kv_onnx_dtype if self.kv_cache else "FLOAT16"
        return getattr(onnx.TensorProto, dtype)

    def as_precision(self) -> Precision:
        return Precision(self.weights or FLOAT_WEIGHTS, self.lm_head, self.kv_cache)

    @property
    def precision(self) -> str:
        return str(self.as_precision())

    def linear_format(self, module: str, store: TensorStore) -> str | None:
        """A Linear is quantized when ModelOpt calibrated its weight quantizer (or GPTQ packed it)."""
        if self.gptq is not None and f"{module}.qweight" in store:
            return self.weights
        if f"{module}.weight_quantizer._amax" not in store:
            return None
        return self.lm_head if module == self.lm_head_module else self.weights

    def kv_scales(self, attention_module: str, store: TensorStore) -> tuple[float, float] | None:
        """[k_amax / 448, v_amax / 448] for an fp8 KV cache, else None."""
        if self.kv_cache != "fp8":
            return None
        amax = [float(store.get(f"{attention_module}.{kv}_bmm_quantizer._amax").float()) for kv in ("k", "v")]
        return amax[0] / FP8_E4M3_MAX, amax[1] / FP8_E4M3_MAX
