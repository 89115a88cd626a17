"""Graph plumbing: the ONNX builder, small graph ops and weight streams every exporter shares."""
