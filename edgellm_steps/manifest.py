"""Stage manifests: what a step produced, by content.

Each step ends by writing ``manifest.json`` beside its artifacts: every file it
wrote with its size and xxh3-128 digest, plus the step's parameters. Consumers
depend on the manifest, not on the bulky files' timestamps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm_steps.digests import file_digest

MANIFEST_NAME = "manifest.json"


def write_manifest(directory: Path, *, step: str, parameters: dict[str, Any]) -> Path:
    """Digest every file in ``directory`` and write the manifest there."""
    files = {
        p.name: {"bytes": p.stat().st_size, "xxh3_128": file_digest(p)}
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {"step": step, "parameters": parameters, "files": files}
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
