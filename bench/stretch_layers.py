"""A quantize-llm output stretched to more decoder layers by repeating its own (for export benchmarks only).

An export's cost depends on the shapes it converts and packs, not on the values, while quantizing all
32 layers of the 8B shape with int4_awq takes 70 minutes on a 2-core machine. Layer ``j`` of the
stretched checkpoint is layer ``j mod n`` of the source, tensor for tensor (weights, ``_amax``,
``_pre_quant_scale``); every other tensor and file is copied, ``num_hidden_layers`` is raised, and
the quantize-llm manifest is written again over the new files (its parameters unchanged), so that
export-llm reads the result as the quantized checkpoint it stands in for. Never a checkpoint to deploy.

    .venv/bin/python -m bench.stretch_layers SOURCE DESTINATION --layers 32
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.checkpoint import TensorStore
from edgellm_steps.artifacts.manifest import MANIFEST_NAME, check_step_output, write_manifest
from edgellm_steps.artifacts.shard_writer import INDEX, ShardWriter

log = logging.getLogger("stretch_layers")
LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def stretch(source: Path, destination: Path, layers: int) -> None:
    parameters = check_step_output(source, steps.QUANTIZE_LLM, contents=False)["parameters"]
    config = json.loads((source / "config.json").read_text())
    present = config["num_hidden_layers"]
    store = TensorStore(source)
    by_layer: dict[int, list[tuple[str, str]]] = {}
    others = []
    for name in store.names():
        match = LAYER.match(name)
        if match:
            by_layer.setdefault(int(match.group(2)), []).append((match.group(1), match.group(3)))
        else:
            others.append(name)
    destination.mkdir(parents=True)
    writer = ShardWriter(destination)
    for name in others:
        writer.add(name, store.get(name))
    writer.end_group()
    for layer in range(layers):
        for prefix, suffix in by_layer[layer % present]:
            writer.add(f"{prefix}{layer}{suffix}", store.get(f"{prefix}{layer % present}{suffix}"))
        writer.end_group()
        log.info("layer %d/%d written", layer + 1, layers)
    writer.close()
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (MANIFEST_NAME, INDEX):
            shutil.copyfile(path, destination / path.name)
    config["num_hidden_layers"] = layers
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_manifest(destination, step=steps.QUANTIZE_LLM, parameters=parameters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a quantize-llm output directory")
    parser.add_argument("destination", type=Path, help="a new directory")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers of the stretched checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    stretch(args.source, args.destination, args.layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
