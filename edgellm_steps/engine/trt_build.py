"""The TensorRT build itself: a strongly typed network parsed from ONNX, with the Edge-LLM plugins loaded.

Needs the ``engine`` extra (TensorRT) and a GPU; everything around it is checked and written elsewhere.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgellm_steps.errors import EdgeLLMError


def serialize_engine(onnx_path: Path, profiles: list[dict], plugin: Path) -> bytes:
    """The serialized engine of ``onnx_path`` with one optimization profile per entry of ``profiles``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeLLMError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EdgeLLMError(f"TensorRT failed to build {onnx_path}; see the TensorRT messages above")
    return bytes(engine)
