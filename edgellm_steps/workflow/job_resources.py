"""What each job asks of the scheduler: host memory, threads, GPUs, and the SM-specific cluster placement.

Memory comes from the measured peak models of ``workflow/resources.py``; threads and devices from
the config. None of these is recorded: where and how a job runs does not change what it builds.
"""

from __future__ import annotations

import math

from edgellm_steps.artifacts.checkpoint import DecoderDims
from edgellm_steps.artifacts.draft_weights import draft_weight_files
from edgellm_steps.lora.peft_adapter import adapter_weight_bytes, read_adapter
from edgellm_steps.quant.formats import FLOAT_WEIGHTS
from edgellm_steps.quant.precision import Precision
from edgellm_steps.quant.recipes import calibration_batch_size
from edgellm_steps.workflow import resources
from edgellm_steps.workflow.model_facts import Facts


def _layer_parameters(dims: DecoderDims) -> int:
    """Weights of one decoder layer: q, k, v and o, and the three MLP matrices."""
    attention = dims.head_dim * (2 * dims.num_heads + 2 * dims.num_kv_heads) * dims.hidden_size
    return attention + 3 * dims.hidden_size * dims.intermediate_size


class JobResources:
    """Resources of every rule's jobs, answered from the checked facts."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def _quantize_mem_mb(self, model: str, precision: Precision, weight_bytes: int) -> int:
        checked = self.facts.model(model)
        quant = checked.settings.quantization
        batch = min(quant.batch_size or calibration_batch_size(precision), quant.calib_size)
        return resources.quantize_mem_mb(
            weight_bytes,
            precision.weights,
            batch=batch,
            tokens=quant.calib_max_tokens,
            vocab_size=checked.checkpoint.dims.vocab_size,
        )

    def quantize_mem_mb(self, model: str, precision: str) -> int:
        """Host RAM of a quantize job, which holds one decoder layer (resources.py): from the shared statistics, the
        layer and the embedding table; calibrating on the text (AWQ), also the cached states and its activations."""
        parsed = self.facts.model(model).precision(precision)
        return self._layerwise_mem_mb(model, "from statistics" if parsed.from_statistics else "on the text")

    def _layerwise_mem_mb(self, model: str, kind: str) -> int:
        """mem_mb of a job of the shared calibration, from the model's shapes (float32: the CPU's calibration dtype,
        an upper bound of what a GPU job keeps on the host)."""
        checked = self.facts.model(model)
        dims, quant = checked.checkpoint.dims, checked.settings.quantization
        return resources.layerwise_mem_mb(
            kind,
            layer_bytes=4 * _layer_parameters(dims),
            state_bytes=4 * quant.calib_size * quant.calib_max_tokens * dims.hidden_size,
            table_bytes=4 * dims.vocab_size * dims.hidden_size,
        )

    def calibrate_mem_mb(self, model: str) -> int:
        """Host RAM of a calibrate-llm job: one decoder layer and the cached hidden states (resources.py)."""
        return self._layerwise_mem_mb(model, "calibrate")

    def quantize_draft_mem_mb(self, model: str) -> int:
        """Host RAM of a quantize-draft job: the float base runs beside the draft being calibrated."""
        checked = self.facts.model(model)
        draft_bytes = sum(p.stat().st_size for p in draft_weight_files(checked.draft_checkpoint))
        return self._quantize_mem_mb(model, checked.draft_precision, checked.weight_bytes + draft_bytes)

    def quantize_threads(self, model: str) -> int:
        return self.facts.model(model).settings.quantization.threads

    def quantize_gpus(self, model: str) -> int:
        """1 when calibration runs on a GPU (any GPU: the quantized checkpoint is not SM-specific)."""
        return int(self.facts.model(model).settings.quantization.device == "cuda")

    def verify_mem_mb(self, model: str, precision: str) -> int:
        """Host RAM of a verify job: a measured multiple of the source's bytes (resources.py)."""
        checked = self.facts.model(model)
        checked.precision(precision)
        held = checked.checkpoint.held
        if held is None:
            return resources.verify_mem_mb(checked.weight_bytes)
        return resources.verify_mem_mb(checked.weight_bytes, held.precision.weights, unified=held.unified)

    def accuracy_mem_mb(self, model: str) -> int:
        """Host RAM of an accuracy-report job: one layer (or the LM head) of one export at a time, a chunk's logits,
        the baseline's log-probabilities and hidden states, the KV caches (resources.py)."""
        checked = self.facts.model(model)
        accuracy, dims = checked.settings.accuracy, checked.checkpoint.dims
        kv_per_token = 2 * dims.num_kv_heads * dims.head_dim
        return resources.accuracy_mem_mb(
            segment_bytes=2 * max(_layer_parameters(dims), dims.vocab_size * dims.hidden_size),
            vocab_size=dims.vocab_size,
            samples=accuracy.samples,
            tokens=accuracy.tokens,
            compared=sum(1 for p in checked.settings.precisions if p != FLOAT_WEIGHTS),
            cache_bytes=2 * dims.num_layers * kv_per_token * accuracy.tokens,
            hidden_bytes=2 * accuracy.samples * resources.ACCURACY_LAYER_ROWS * dims.num_layers * dims.hidden_size,
        )

    def verify_visual_mem_mb(self, model: str) -> int:
        """Host RAM of a vision verify job: bounded by the verify of the whole model (the tower is a part)."""
        return resources.verify_mem_mb(self.facts.model(model).weight_bytes)

    def merge_lora_mem_mb(self, model: str, adapter: str) -> int:
        """Host RAM of a merge-lora job: it streams the checkpoint and holds the adapter and one adapted weight in
        float32 (resources.py), so the adapter's widest module sizes it (read from its header)."""
        path = self.facts.model(model).adapter_checkpoint(adapter)
        _, modules = read_adapter(path, tensors=False, lm_head=True)
        widest = max(m.in_features * m.out_features for m in modules)
        return resources.merge_lora_mem_mb(widest_weight_bytes=4 * widest, adapter_bytes=adapter_weight_bytes(path))

    def dequantize_mem_mb(self, model: str) -> int:
        """Host RAM of a dequantize-fp8 job: it streams one row of blocks at a time (resources.py)."""
        self.facts.model(model).checkpoint  # noqa: B018 (a source checked before its job is sized)
        return resources.dequantize_mem_mb()

    def export_threads(self, model: str) -> int:
        return self.facts.model(model).settings.export.threads

    def verify_threads(self, model: str) -> int:
        return self.facts.model(model).settings.verify.threads

    def engine_mem_mb(self, model: str) -> int:
        """Host RAM of an engine job: a multiple of the source checkpoint's weight bytes, at least 4 GB."""
        factor = float(self.facts.section("engine").get("host_memory_factor", 4))
        return max(4096, math.ceil(factor * self.facts.model(model).weight_bytes / 2**20))

    def engine_constraint(self, sm: int | str) -> str:
        return str(self.facts.section("cluster").get("constraints", {}).get(str(sm), f"sm{sm}"))

    def engine_partition(self, sm: int | str) -> str:
        """The mapped partition, or "" (the executor's default partition)."""
        return str(self.facts.section("cluster").get("partitions", {}).get(str(sm), ""))
