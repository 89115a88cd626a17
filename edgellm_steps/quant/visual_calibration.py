"""fp8 calibration of a vision tower with ModelOpt, for ``export-visual --quantization fp8``.

Only the tower is built (its transformers class, float32 on CPU, weights from the
checkpoint's ``prefix*`` tensors): a VLM's language model is billions of parameters the
vision export never needs. ModelOpt's FP8 recipe (the one quantize-llm uses for fp8
weights) fake-quantizes every Linear; the patch embedding, a Conv3d, is left in fp16 as
the contract requires. Calibration runs the tower over generated images
(:mod:`edgellm_steps.quant.calibration_images`), so export-visual needs no data set and
gives the same scales on every run.

The result is what :func:`edgellm_steps.export.quantized_linear.fp8_linear` reads: per fp8 Linear,
``<module>.weight_quantizer._amax`` and ``<module>.input_quantizer._amax`` (and a
``_pre_quant_scale`` when a recipe makes one), under the names the checkpoint spells,
answered by an overlay in front of the checkpoint's own tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from edgellm_steps.artifacts.memory_store import MemoryStore
from edgellm_steps.errors import SourceError
from edgellm_steps.models.vision_geometry import Grid, VisionDims, VisionTower
from edgellm_steps.models.vision_tower import TileFeatures, load_tile_features, load_vision_tower
from edgellm_steps.quant.calibration_images import (
    calibration_images,
    calibration_tiles,
    image_patches,
    read_image_processing,
)
from edgellm_steps.quant.precision import Precision
from edgellm_steps.quant.recipes import modelopt_config

log = logging.getLogger(__name__)

#: Generated images the tower is calibrated on (each a few hundred patches).
DEFAULT_CALIB_IMAGES = 16
#: The patch embedding (a Conv3d, InternViT's a Conv2d) stays fp16 (contract: Conv layers are not quantized).
#: InternVL's projector, outside the tower, is never handed to ModelOpt: its two small GEMMs, whose outputs are
#: the decoder's embeddings, stay fp16.
FP16_MODULES = ("*patch_embed*",)
#: Modules of a tower that its features never pass through (SigLIP's attention-pooling head, under the tower
#: root): their quantizers stay off, as the graph has no place for them.
UNUSED_MODULES = ("head.*",)
#: Tiles per calibration batch of a tiled tower.
TILE_BATCH = 4
#: Module classes whose inputs ModelOpt's recipe would quantize but the graph computes in float:
#: Qwen2-VL's LayerNorms (block norms, the merger's ``ln_q``). Only Linears are fp8 in the graph.
FLOAT_CLASSES = ("nn.LayerNorm",)
#: Quantizer tensors fp8_linear reads (and ModelOpt state-dict names), per quantized Linear.
QUANTIZERS = ("weight_quantizer", "input_quantizer")


def calibration_inputs(
    checkpoint: Path, dims: VisionDims, count: int = DEFAULT_CALIB_IMAGES
) -> list[tuple[torch.Tensor, Grid]]:
    """The tower's input patches and grid for each of ``count`` generated images, sized for this checkpoint."""
    processing = read_image_processing(checkpoint)
    block = dims.patch_size * dims.merge_size
    images = calibration_images(count, block, min_pixels=processing.min_pixels, max_pixels=processing.max_pixels)
    inputs = []
    for image in images:
        patches, grid = image_patches(image, dims, processing)
        inputs.append((torch.from_numpy(patches), grid))
    return inputs


def fp8_tower_config() -> dict[str, Any]:
    """quantize-llm's fp8 recipe with every quantizer the graph has no place for disabled.

    The graph quantizes the inputs and weights of Linears only; a quantizer left on elsewhere
    (the patch Conv3d, a LayerNorm's input) would make the calibrated tower compute something
    the graph does not.
    """
    config = modelopt_config(Precision("fp8"), FP16_MODULES + UNUSED_MODULES)
    config["quant_cfg"] += [{"quantizer_name": "*", "parent_class": cls, "enable": False} for cls in FLOAT_CLASSES]
    return config


def calibrated_tower(
    tower: VisionTower, *, store: Any = None, images: int = DEFAULT_CALIB_IMAGES
) -> torch.nn.Module | TileFeatures:
    """The checkpoint's vision tower, fake-quantized to fp8 by ModelOpt and calibrated on generated images.

    Also the reference the tests hold the fp8 graph to: the same call gives the same scales. ``store``
    replaces the tower's own tensors when given.
    """
    import modelopt.torch.quantization as mtq

    if tower.spec.tiled:
        return _calibrated_tiles(tower, store, images)
    model = load_vision_tower(
        tower.checkpoint, tower.spec, tower.store if store is None else store, tower.prefix, dtype=torch.float32
    )
    inputs = calibration_inputs(tower.checkpoint, tower.dims, images)

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for patches, grid in inputs:
                model(patches, grid_thw=torch.tensor([grid]))

    mtq.quantize(model, fp8_tower_config(), forward_loop=forward_loop)
    log.info(
        "calibrated the vision tower on %d generated images (%d patches)",
        len(inputs),
        sum(patches.shape[0] for patches, _ in inputs),
    )
    return model


def _calibrated_tiles(tower: VisionTower, store: Any, images: int) -> TileFeatures:
    """A tiled tower's feature path (tower and projector), fake-quantized and calibrated on generated tiles."""
    import modelopt.torch.quantization as mtq

    features = load_tile_features(tower, store)
    tiles = torch.from_numpy(calibration_tiles(tower.checkpoint, tower.dims.image_size, images))

    def forward_loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for start in range(0, len(tiles), TILE_BATCH):
                features(tiles[start : start + TILE_BATCH])

    # The tower alone, named from its own root: the recipe disables every quantizer under ``*vision_tower*``.
    mtq.quantize(features.tower, fp8_tower_config(), forward_loop=forward_loop)
    log.info("calibrated the vision tower on %d generated tiles", len(tiles))
    return features


def quantized_modules(calibrated: Any) -> torch.nn.Module:
    """The calibrated tower module whose Linears are named as the checkpoint names them under the tower prefix."""
    return calibrated.tower if isinstance(calibrated, TileFeatures) else calibrated


def _enabled(module: torch.nn.Module, quantizer: str) -> bool:
    found = getattr(module, quantizer, None)
    return found is not None and found.is_enabled


def _check_float(module: torch.nn.Module, name: str) -> None:
    """A module that is not a Linear must keep every quantizer off: the graph computes it in float."""
    for quantizer in QUANTIZERS:
        if _enabled(module, quantizer):
            raise SourceError(
                f"{name}: ModelOpt's recipe enabled its {quantizer}, but the vision graph quantizes Linears only; "
                "disable it in the vision fp8 recipe (FP16_MODULES / FLOAT_CLASSES)"
            )


def quantizer_tensors(tower: torch.nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Every fp8 Linear's calibrated quantizer tensors (checkpoint names, with ``prefix``) and the Linears' names.

    A Linear counts as fp8 when its weight quantizer is enabled; its input quantizer must then
    hold an amax too, or the graph would have no activation scale (a Linear calibration never
    reached).
    """
    tensors: dict[str, torch.Tensor] = {}
    modules = set()
    for name, module in tower.named_modules():
        if not isinstance(module, torch.nn.Linear):
            _check_float(module, f"{prefix}{name}")
            continue
        if not _enabled(module, "weight_quantizer"):
            continue
        for quantizer in QUANTIZERS:
            amax = getattr(module, quantizer).amax if _enabled(module, quantizer) else None
            if amax is None:
                raise SourceError(
                    f"{prefix}{name}: ModelOpt left its {quantizer} uncalibrated; the calibration images never "
                    "reached this Linear, so it has no fp8 scale"
                )
            tensors[f"{prefix}{name}.{quantizer}._amax"] = amax.detach().float().cpu().clone()
        pre_quant = getattr(module.input_quantizer, "pre_quant_scale", None)
        if pre_quant is not None:
            tensors[f"{prefix}{name}.input_quantizer._pre_quant_scale"] = pre_quant.detach().float().cpu().clone()
        modules.add(f"{prefix}{name}")
    return tensors, frozenset(modules)


def calibrate_fp8_tower(tower: VisionTower) -> tuple[MemoryStore, frozenset[str]]:
    """The tower's tensors with its calibrated fp8 quantizer tensors in front, and the fp8 Linears' module names."""
    checkpoint, store = tower.checkpoint, tower.store
    tensors, modules = quantizer_tensors(quantized_modules(calibrated_tower(tower)), tower.prefix)
    if not modules:
        raise SourceError(
            f"{checkpoint}: ModelOpt's fp8 recipe quantized no Linear of the vision tower (a recipe pattern such as "
            "*visual* disabled them all); the export would be fp16 under an fp8 name"
        )
    missing = sorted(module for module in modules if f"{module}.weight" not in store)
    if missing:
        raise SourceError(f"{checkpoint}: the fp8 Linear {missing[0]} has no weight tensor in the checkpoint")
    log.info("%d Linears of the vision tower are fp8; the patch embedding stays fp16", len(modules))
    return MemoryStore(tensors, store, where=str(checkpoint)), modules
