"""quantize-draft: an EAGLE3 draft -> a ModelOpt fake-quantized draft, calibrated through its base model.

The draft never sees text: at run time it reads the base's three hidden states (contract 5)
and the base's embeddings of the next tokens. Calibration therefore runs the float base over
the corpus and feeds the draft exactly that, in the two ways the runtime drives it:

- the first draft step: at position t, the base's states of position t and the embedding of
  token t+1, the draft's own state zero;
- a later step: the draft's own pre-norm state of position t at position t+1, the base's zero.

The output is the draft's own layout, quantized: ``model.safetensors`` (the draft's tensors,
weights with ModelOpt's smoothing / AWQ scales folded in, every quantizer's ``_amax`` /
``_pre_quant_scale``, and ``d2t`` / ``t2d`` / ``embed_tokens`` as the source has them), its
``config.json`` byte for byte, ``modelopt_state.pth`` and ``edgellm_quantization.json``, so
export-draft reads it as export-llm reads a quantized base. The draft's precision is its own:
the base stays float here whatever precision its exports have.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from edgellm_steps.artifacts import steps
from edgellm_steps.artifacts.atomic import staged_directory
from edgellm_steps.artifacts.checkpoint import TensorStore, decoder_dims
from edgellm_steps.artifacts.draft_weights import open_draft_store
from edgellm_steps.artifacts.manifest import write_manifest
from edgellm_steps.artifacts.safetensors_io import write_safetensors
from edgellm_steps.artifacts.sources import read_hf_config, resolve_source
from edgellm_steps.errors import EdgeLLMError, PrecisionError
from edgellm_steps.models.eagle import check_draft_fits, eagle_hidden_state_indices
from edgellm_steps.models.families import EAGLE3_DRAFT
from edgellm_steps.quant.calibration import calibration_batches, calibration_record
from edgellm_steps.quant.checkpoint_record import open_checkpoint
from edgellm_steps.quant.draft_quantizers import register_draft_attention
from edgellm_steps.quant.model_skeleton import ModelSkeleton
from edgellm_steps.quant.nvfp4 import cpu_fake_quantization
from edgellm_steps.quant.prequantized import MODELOPT_STATE, QUANT_INFO, HeldPrecision, held_precision
from edgellm_steps.quant.quantize_llm import (
    device_and_dtype,
    quantizable_precision,
    quantization_record,
    save_modelopt_state,
)
from edgellm_steps.quant.recipes import calibration_batch_size, modelopt_config
from edgellm_steps.quant.shape_checks import check_draft_block_dims

log = logging.getLogger(__name__)

#: A draft is one layer: fewer samples than quantize-llm's 512 calibrate it as well.
DEFAULT_DRAFT_CALIB_SIZE = 256
DEFAULT_DRAFT_CALIB_MAX_TOKENS = 512
DRAFT_WEIGHTS = "model.safetensors"


def _refuse_quantized(checkpoint: Path, held: HeldPrecision | None, role: str, fix: str) -> None:
    if held is not None:
        raise PrecisionError(
            f"{checkpoint}: the {role} is already quantized as {held.precision} ({held.origin}); {fix}"
        )


def quantize_draft(
    base_model_dir: str | Path,
    draft_model_dir: str | Path,
    output_dir: str | Path,
    *,
    precision: str,
    dataset_dir: str | None = None,
    device: str = "cpu",
    calib_size: int = DEFAULT_DRAFT_CALIB_SIZE,
    calib_max_tokens: int = DEFAULT_DRAFT_CALIB_MAX_TOKENS,
    calib_batch_size: int | None = None,
) -> Path:
    """Quantize the EAGLE3 draft ``draft_model_dir`` of ``base_model_dir`` with ModelOpt."""
    started = time.monotonic()
    precision = quantizable_precision(precision)
    if calib_max_tokens < 2:
        raise EdgeLLMError("draft calibration needs samples of at least 2 tokens (a token and the next one)")
    device, dtype = device_and_dtype(device)
    opened = open_checkpoint(base_model_dir)
    base, base_config, spec = opened.path, opened.hf_config, opened.spec
    draft = resolve_source(str(draft_model_dir), allow_download=True)
    draft_config = read_hf_config(draft)
    _refuse_quantized(base, opened.held, "base", "calibrate the draft through the unquantized base checkpoint")
    _refuse_quantized(draft, held_precision(draft, draft_config), "draft", "export it directly")
    check_draft_fits(draft_config, base_config, str(draft))
    EAGLE3_DRAFT.check_dims(decoder_dims(draft_config))
    check_draft_block_dims(draft_config, precision, where=str(draft))
    TensorStore(base)  # every shard header checked before calibration
    store = open_draft_store(draft)

    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from tqdm import tqdm

    from edgellm_steps.models.eagle3_draft import Eagle3Draft

    batch = calib_batch_size or calibration_batch_size(precision)
    batches = calibration_batches(base, dataset_dir, calib_size, calib_max_tokens, batch)
    log.info(
        "calibrating the draft as %s through %s on %d samples x %d tokens (batch %d) on %s",
        precision,
        base,
        calib_size,
        calib_max_tokens,
        batch,
        device,
    )
    # The base as a skeleton (quant/model_skeleton.py): its layers below the deepest picked state run one at a
    # time in float from the shards (safetensors only), so memory holds one base layer and the picked states,
    # never the whole base; the states are exactly those of the whole base's forward.
    picks = eagle_hidden_state_indices(decoder_dims(base_config).num_layers)
    skeleton = ModelSkeleton(base, getattr(transformers, spec.hf_auto_class), spec.hf_renames, dtype, device)
    found = skeleton.float_states(batches, {0, *picks})
    del skeleton
    register_draft_attention()
    model = Eagle3Draft.from_store(draft_config, store).to(device=device, dtype=dtype)

    def forward_loop(quant_model) -> None:
        with torch.no_grad():
            for b in tqdm(range(len(batches)), desc="calibration", unit="batch", file=sys.stderr, mininterval=5):
                hidden_in = torch.cat([found[i][b] for i in picks], dim=-1)[:, :-1]
                embeds = found[0][b][:, 1:]  # the base's embeddings of the next tokens
                _, own = quant_model(embeds, hidden_in, torch.zeros_like(embeds))
                quant_model(embeds[:, 1:], torch.zeros_like(hidden_in[:, 1:]), own[:, :-1])

    with cpu_fake_quantization():
        mtq.quantize(model, modelopt_config(precision), forward_loop=forward_loop)
    calibration = calibration_record(dataset_dir, calib_size, calib_max_tokens, batch, device)
    info = {**quantization_record(precision, calibration), "kind": "eagle3_draft", "base_model": str(base_model_dir)}
    tensors = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()}
    tensors.update({name: store.get(name) for name in store.names() if name not in tensors})
    with staged_directory(Path(output_dir)) as staging:
        write_safetensors(staging / DRAFT_WEIGHTS, tensors, metadata={"format": "pt"})
        shutil.copyfile(draft / "config.json", staging / "config.json")
        save_modelopt_state(model, staging / MODELOPT_STATE)
        (staging / QUANT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(staging, step=steps.QUANTIZE_DRAFT, parameters=info)
    log.info("draft quantization finished in %.1f s", time.monotonic() - started)
    return Path(output_dir)
