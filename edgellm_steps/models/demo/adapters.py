"""PEFT LoRA adapters made locally for a tiny checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def make_lora_adapter(
    output_dir: str | Path,
    base_dir: str | Path,
    target_modules: list[str],
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float = 8,
    b_scale: float = 0.1,
    **options: Any,
):
    """Write a PEFT LoRA adapter for the tiny base ``base_dir`` with random A and B; returns the PEFT model.

    PEFT starts B at zero, which would make every adapter a no-op: ``init_lora_weights=False`` draws
    both, and B is scaled by ``b_scale`` so the delta stays comparable to the base GEMMs' outputs.
    ``options`` go to ``peft.LoraConfig`` (``use_rslora``, ``rank_pattern``, ``use_dora``, ...).
    """
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = peft.LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules, init_lora_weights=False, **options
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    peft_model.save_pretrained(str(output_dir))
    log.info("wrote a LoRA adapter (r=%d, %s) to %s", r, ", ".join(target_modules), output_dir)
    return peft_model.eval()
