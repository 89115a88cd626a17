"""TensorRT engines: optimization profiles and the build step."""
