"""Files on disk: atomic staged writes, claims, manifests, safetensors and checkpoint reading."""
