"""Tiny real checkpoints: a transformers architecture from a small config, seeded weights, a local tokenizer."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from edgellm_steps.models.demo.families import TINY_FAMILIES, TINY_SIZES
from edgellm_steps.models.demo.tokenizer import train_tokenizer
from edgellm_steps.models.families import FAMILIES

log = logging.getLogger(__name__)


def make_checkpoint(
    output_dir: str | Path,
    *,
    family: str = "qwen2",
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "float16",
    vision: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` with tokenizer and chat template.

    ``dtype`` is what the weights are saved in and ``config.json`` records: ``float16``,
    ``bfloat16`` (what most HF checkpoints ship) or ``float32``.

    A vision-language family (``qwen2_vl``, ``qwen2_5_vl``) gets a transformers 5 config
    (``text_config`` with the tiny decoder sizes and ``overrides``, ``vision_config`` with a
    2-block vision tower whose merger outputs the decoder's width), top-level
    ``image_token_id`` / ``video_token_id`` / ``vision_start_token_id`` / ``vision_end_token_id``
    pointing at the tokenizer's own special tokens, and a ``preprocessor_config.json``.
    transformers 5 saves its weights as ``model.embed_tokens`` / ``model.layers.*`` /
    ``model.norm``, ``visual.*`` and ``lm_head``. ``vision`` overrides keys of the tiny ``vision_config``.

    InternVL (``internvl``) saves as its ``-hf`` checkpoints are published: ``language_model.model.*``,
    ``vision_tower.*`` and ``multi_modal_projector.*``, the LM head tied to the embeddings; its projector
    outputs the decoder's width by construction, and the parameters its initialization leaves constant
    (CLS token, position embeddings, layer scales) are drawn at random so that each one shows in the output.
    """
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: expected float16, bfloat16 or float32")
    import torch
    import transformers

    spec = TINY_FAMILIES[family]
    tokenizer = train_tokenizer(family)
    sizes = copy.deepcopy({**TINY_SIZES, **spec["config"], **overrides})
    sizes.setdefault("vocab_size", len(tokenizer))
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config_class = getattr(transformers, spec["config_class"])
    if "vision" in spec:
        # A VLM: the decoder sizes go to text_config, the tiny vision tower to vision_config, and
        # the image / video / vision start-end ids to the tokenizer's special tokens.
        # The merger's output width is the decoder's (its features replace token embeddings).
        vision_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in spec["token_ids"].items()}
        out_width_key = next(f.vision.out_width_key for f in FAMILIES if f.family == family)
        vision_config = {**spec["vision"], **(vision or {})}
        if out_width_key is not None:
            vision_config[out_width_key] = sizes["hidden_size"]
        if spec.get("flat_text"):  # Phi-4-multimodal: decoder sizes at the top, placeholder ids in the sub-configs
            audio_ids = {key: tokenizer.convert_tokens_to_ids(t) for key, t in spec["audio_token_ids"].items()}
            audio_config = {**spec["audio"], **audio_ids}
            vision_config |= vision_ids
            config = config_class(**sizes, **token_ids, vision_config=vision_config, audio_config=audio_config)
        else:
            config = config_class(text_config={**sizes, **token_ids}, vision_config=vision_config, **vision_ids)
    else:
        config = config_class(**sizes, **token_ids)
    torch.manual_seed(seed)
    if "model_class" in spec:
        model = getattr(transformers, spec["model_class"])._from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    _draw_constant_parameters(model)
    if "redraw" in spec:
        _redraw(model, *spec["redraw"])
    model = model.to(getattr(torch, dtype))
    output_dir = Path(output_dir)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(output_dir), **save_kwargs)
    tokenizer.save_pretrained(str(output_dir))
    if "vision" in spec:
        write = {"internvl": _save_tile_processor, "phi4mm": _save_crop_processor}.get(family, _save_image_processor)
        write(output_dir, config, spec)
    log.info("wrote a tiny %s checkpoint (%d parameters) to %s", family, model.num_parameters(), output_dir)
    return output_dir


def _save_image_processor(output_dir: Path, config: Any, spec: dict[str, Any]) -> None:
    """``preprocessor_config.json`` of the Qwen-VL image processor, sized to the tiny vision tower.

    Written as the hub's Qwen-VL checkpoints hold it (CLIP mean and std; Qwen3-VL's 0.5). It is
    written directly: transformers' ``Qwen2VLImageProcessor`` needs torchvision and Pillow,
    which this project does not install.
    """
    import json

    vision = config.vision_config
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": spec["processor_class"],
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": spec.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "image_std": spec.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        # Small images: 4 to 64 merged tokens, each covering (patch_size * merge_size)^2 pixels.
        "min_pixels": 4 * (vision.patch_size * vision.spatial_merge_size) ** 2,
        "max_pixels": 64 * (vision.patch_size * vision.spatial_merge_size) ** 2,
    }
    (output_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")


#: Parameters transformers initializes to a constant (zeros, or InternViT's 0.1 layer scale): a graph that
#: dropped or misplaced one would still match a freshly initialized model.
CONSTANT_INIT = (
    "cls_token",
    "position_embeddings",
    "lambda_1",
    "lambda_2",
    "global_img_feature_extensor",
    "sub_img_feature_extensor",
)


def _draw_constant_parameters(model: Any) -> None:
    """Give every :data:`CONSTANT_INIT` parameter random values (seeded by the caller's ``torch.manual_seed``)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rpartition(".")[2] in CONSTANT_INIT:
                parameter.copy_(torch.randn_like(parameter) * (2.0 if "lambda" in name else 0.2))


def _redraw(model: Any, prefix: str, std: float) -> None:
    """Draw the parameters under ``prefix`` afresh: matrices with ``std``, norm scales about 1, biases about 0.

    For a tower whose transformers initialization draws unit-variance weights (Phi-4-multimodal's SigLIP):
    its activations would grow a hundredfold per block, far from a trained tower's.
    """
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(prefix):
                continue
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn_like(parameter) * std)
            elif name.endswith("weight"):
                parameter.copy_(1 + torch.randn_like(parameter) * 0.1)
            else:
                parameter.copy_(torch.randn_like(parameter) * 0.05)


def _save_tile_processor(output_dir: Path, config: Any, spec: dict[str, Any]) -> None:
    """InternVL's ``preprocessor_config.json`` (GotOcr2's tiling image processor), sized to the tiny tower's tiles.

    Written as the ``-hf`` checkpoints hold it, directly (the processor classes need torchvision).
    """
    import json

    side = config.vision_config.image_size[0]
    processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": spec["processor_class"],
        "crop_to_patches": False,
        "min_patches": 1,
        "max_patches": 12,
        "do_resize": True,
        "size": {"height": side, "width": side},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": spec["image_mean"],
        "image_std": spec["image_std"],
    }
    (output_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")


def _save_crop_processor(output_dir: Path, config: Any, spec: dict[str, Any]) -> None:
    """Phi-4-multimodal's ``preprocessor_config.json`` (its HD-crop processor), sized to the tiny tower's crops."""
    import json

    vision = config.vision_config
    processor = {
        "image_processor_type": "Phi4MultimodalImageProcessorFast",
        "processor_class": spec["processor_class"],
        "size": {"height": vision.crop_size, "width": vision.crop_size},
        "patch_size": vision.patch_size,
        "dynamic_hd": 36,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": spec["image_mean"],
        "image_std": spec["image_std"],
    }
    (output_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
