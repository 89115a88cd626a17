"""Quantization: the precision grammar, per-format facts and recipes, calibration, the quantize step."""
