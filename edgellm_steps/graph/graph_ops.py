"""Graph pieces every model graph (decoder, vision tower, EAGLE draft) builds the same way."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from edgellm_steps.graph.onnx_builder import GraphBuilder


def fp16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float16).contiguous().numpy()


def add_bias(g: GraphBuilder, store, module: str, y: str, path: str) -> str:
    """``y`` plus the Linear's bias (float16) when the checkpoint has one."""
    if f"{module}.bias" not in store:
        return y
    bias = g.weight(f"{module}.bias", fp16(store.get(f"{module}.bias")))
    return g.op("Add", [y, bias], f"{path}/Add")


def rms_norm(g: GraphBuilder, store, weight_name: str, x: str, path: str, eps: float) -> str:
    """HF RMSNorm: statistics in float32, scale applied in float16 after the cast back."""
    weight = g.weight(weight_name, fp16(store.get(weight_name)))
    xf = g.op("Cast", [x], f"{path}/Cast", to=TensorProto.FLOAT)
    square = g.op("Mul", [xf, xf], f"{path}/Pow")
    axes = g.constant(np.array([-1], dtype=np.int64), "axes_last")
    mean = g.op("ReduceMean", [square, axes], f"{path}/ReduceMean", keepdims=1)
    shifted = g.op("Add", [mean, g.constant(np.array(eps, dtype=np.float32), "rms_norm_eps")], f"{path}/Add")
    rstd = g.op("Reciprocal", [g.op("Sqrt", [shifted], f"{path}/Sqrt")], f"{path}/Reciprocal")
    normed = g.op("Cast", [g.op("Mul", [xf, rstd], f"{path}/Mul")], f"{path}/Cast_1", to=TensorProto.FLOAT16)
    return g.op("Mul", [normed, weight], f"{path}/Mul_1")
