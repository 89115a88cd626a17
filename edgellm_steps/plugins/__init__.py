"""TensorRT plugin ops of the Edge-LLM runtime.

One module per op: the ONNX emission, and a real NumPy implementation of the
op's semantics that lets exported graphs run on the CPU (through
``onnx.reference``) so they can be checked against transformers without a GPU.
"""

from edgellm_steps.plugins.attention import AttentionPluginOp
from edgellm_steps.plugins.fp4_quantize import TRT_FP4DynamicQuantizeOp
from edgellm_steps.plugins.int4_gemm import Int4GroupwiseGemmPluginOp

#: ``onnx.reference`` implementations of every custom op our graphs carry.
REFERENCE_OPS = (AttentionPluginOp, Int4GroupwiseGemmPluginOp, TRT_FP4DynamicQuantizeOp)
