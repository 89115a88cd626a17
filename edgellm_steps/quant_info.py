"""The quantize step's record in a quantized checkpoint (``edgellm_quantization.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANT_INFO = "edgellm_quantization.json"


def read_quant_info(checkpoint: Path) -> dict[str, Any] | None:
    """The record, or None for an unquantized checkpoint."""
    path = Path(checkpoint) / QUANT_INFO
    return json.loads(path.read_text()) if path.is_file() else None
