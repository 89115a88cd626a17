"""The ONNX opsets of the exports, in a module planning can read without importing onnx."""

#: The opset of every export (contract section 3).
OPSET = 19
#: FP4 tensors (NVFP4) first exist in opset 23; graphs that carry them import it instead.
FP4_OPSET = 23
