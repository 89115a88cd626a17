"""The ONNX facts of every export that planning reads too: opsets and file names, without importing onnx."""

#: The opset of every export (contract section 3).
OPSET = 19
#: FP4 tensors (NVFP4) first exist in opset 23; graphs that carry them import it instead.
FP4_OPSET = 23
#: The graph file of every export, and the external-data file its weights live in.
ONNX_NAME = "model.onnx"
EXTERNAL_DATA_FILE = "onnx_model.data"
