"""ModelOpt's view of the EAGLE3 draft module: KV-cache quantizers, and restoring a quantized draft.

ModelOpt converts every ``nn.Linear`` of :class:`~edgellm_steps.models.eagle3_draft.Eagle3Draft`
by itself. Its KV-cache quantizers exist only in the attention classes it knows (transformers'),
so the draft's attention is registered here with a quantized subclass that adds
``k_bmm_quantizer`` / ``v_bmm_quantizer`` where the runtime writes the cache (K after rotary).
``FP8_KV_CFG`` then enables and calibrates them by those names, their ``_amax`` is saved beside
the weights, and the export reads them as the attention plugin's KV scales, exactly as for a
base model. The registration must precede both quantization and restoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm_steps.errors import SourceError
from edgellm_steps.quant.prequantized import load_modelopt_state


def register_draft_attention() -> None:
    """Teach ModelOpt the draft's attention (idempotent)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    from edgellm_steps.models.eagle3_draft import DraftAttention

    if DraftAttention in QuantModuleRegistry:
        return

    class QuantDraftAttention(QuantModule):
        def _setup(self) -> None:
            self.k_bmm_quantizer = TensorQuantizer()
            self.v_bmm_quantizer = TensorQuantizer()

        def cache_kv(self, k, v):
            return self.k_bmm_quantizer(k), self.v_bmm_quantizer(v)

    mtq.register(original_cls=DraftAttention, quantized_cls=QuantDraftAttention)


def fake_quantized_draft(checkpoint: Path, config: dict[str, Any], store: Any):
    """The draft of a quantize-draft checkpoint with its quantizers restored (weights-only state, stored amax)."""
    import modelopt.torch.opt as mto

    from edgellm_steps.models.eagle3_draft import Eagle3Draft

    register_draft_attention()
    model = Eagle3Draft(config, qkv_bias="midlayer.self_attn.q_proj.bias" in store)
    model = mto.restore_from_modelopt_state(model, modelopt_state=load_modelopt_state(checkpoint))
    state = model.state_dict()
    missing = [name for name in state if name not in store]
    if missing:
        raise SourceError(
            f"{checkpoint}: lacks {missing[:3]} that its {checkpoint.name}/modelopt_state.pth quantizes; "
            "re-create the quantized draft"
        )
    model.load_state_dict({name: store.get(name).float() for name in state})
    return model.eval()
