"""Reading HF checkpoints: normalized dimensions and lazily loaded tensors.

HF configs spell the same facts differently across transformers releases
(4.x: ``rope_theta`` / ``rope_scaling``; 5.x: ``rope_parameters``; ``head_dim``
absent, null or explicit). :func:`decoder_dims` normalizes them in one place.
:func:`weight_files` is the one rule for which files hold the weights;
:class:`TensorStore` reads those safetensors shards by byte range, one tensor (or a
slice of rows) at a time, so a caller never holds more than the tensor it works on.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from edgellm_steps.errors import SourceError

if TYPE_CHECKING:  # planning imports this module and must not pay for importing torch
    import torch

    from edgellm_steps.artifacts.read_ahead import ReadAhead
    from edgellm_steps.artifacts.safetensors_io import SafetensorsFile


@dataclass(frozen=True)
class DecoderDims:
    """The shape facts of a decoder-only LLM that the export needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float
    tie_word_embeddings: bool
    hidden_act: str
    #: Qwen3-VL: decoder layers 0..n-1 each add a deepstack input to their output (contract 3.6);
    #: n = len(vision_config.deepstack_visual_indexes), 0 for every other model.
    deepstack_layers: int = 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _rope_facts(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
        partial = cfg.get("partial_rotary_factor", 1.0)
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling.get("mrope_section") is not None and rope_type in ("default", "mrope"):
            # MRoPE (Qwen2-VL / Qwen2.5-VL; hub configs spell it "mrope", transformers "default"):
            # the spelling the runtime parses as MRoPE (contract section 4). Qwen3-VL interleaves the
            # sections (contract 3.6), and its config.json keeps saying so.
            mrope = _mrope_scaling(scaling["mrope_section"])
            if scaling.get("mrope_interleaved"):
                mrope["mrope_interleaved"] = True
            return theta, mrope, float(partial if partial is not None else 1.0)
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type == "default":
            scaling = None
    return theta, scaling, float(partial if partial is not None else 1.0)


def _mrope_scaling(section: Any) -> dict[str, Any]:
    return {"type": "default", "rope_type": "default", "mrope_section": [int(n) for n in section]}


def decoder_dims(cfg: dict[str, Any]) -> DecoderDims:
    """Normalize an HF decoder ``config.json`` (text part) into :class:`DecoderDims`."""
    deepstack = len((cfg.get("vision_config") or {}).get("deepstack_visual_indexes") or [])
    if "text_config" in cfg and "hidden_size" not in cfg:
        # A VLM (or other composite) config of transformers 5: the decoder's facts live in text_config.
        # Tied embeddings: the top-level flag, or (saves before transformers 5) text_config's, as
        # transformers 5 itself reads them.
        text = cfg["text_config"]
        tied = bool(cfg.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
        cfg = {**text, "tie_word_embeddings": tied}
    try:
        hidden = _positive(cfg, "hidden_size")
        heads = _positive(cfg, "num_attention_heads")
        theta, scaling, partial = _rope_facts(cfg)
        return DecoderDims(
            hidden_size=hidden,
            intermediate_size=_positive(cfg, "intermediate_size"),
            num_layers=_positive(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_positive(cfg, "num_key_value_heads", heads),
            head_dim=_positive(cfg, "head_dim", hidden // heads),
            vocab_size=_positive(cfg, "vocab_size"),
            max_position_embeddings=_positive(cfg, "max_position_embeddings"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            deepstack_layers=deepstack,
        )
    except KeyError as err:
        raise SourceError(
            f"config.json lacks {err.args[0]!r}, which every decoder LLM config has; is it complete?"
        ) from err
    except (TypeError, ValueError) as err:  # a rope or eps entry of the wrong type
        raise SourceError(f"config.json holds a value of the wrong type ({err}); restore the checkpoint's own") from err


def _positive(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    """``cfg[key]`` as a positive integer (``default`` when absent or null), or one line naming the key."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise SourceError(
            f"config.json: {key} is {value!r}, not a positive integer; restore the checkpoint's own config.json"
        )
    return int(value)


def draft_widths(cfg: dict[str, Any]) -> tuple[int, int]:
    """(target_hidden_size, draft_vocab_size) of an EAGLE3 draft ``config.json``.

    Drafts trained for a VLM base may nest every key under ``text_config``: the top level is read
    first, then ``text_config``, then the draft's own hidden size and vocabulary (older drafts
    that share both with their base omit the keys).
    """
    dims = decoder_dims(cfg)
    text = cfg.get("text_config") or {}

    def key(name: str, default: int) -> int:
        return int(cfg.get(name) or text.get(name) or default)

    return key("target_hidden_size", dims.hidden_size), key("draft_vocab_size", dims.vocab_size)


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Pickled weight files: named only to say why such a checkpoint is refused.
PICKLED_PATTERNS = ("pytorch_model*.bin", "*.pth", "*.pt")


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights, sorted: the one rule every step uses.

    The rule mirrors what transformers loads, stricter where the two files could disagree:

    1. ``model.safetensors.index.json`` present: its ``weight_map`` names the shards. Each
       name must be a plain relative path inside the checkpoint (no absolute path, no ``..``);
       only the *name* is checked, since the HF cache keeps snapshot files as symlinks into a
       ``blobs/`` folder outside the snapshot. Every named shard must exist. If
       ``model.safetensors`` exists too, the index must name exactly that file (transformers
       would silently prefer ``model.safetensors``; two disagreeing weight sets are refused).
    2. Else ``model.safetensors`` alone; other ``*.safetensors`` files beside it (an adapter,
       a draft model) are not the model's weights.
    3. Else refused: pickled weights (``pytorch_model*.bin``, ``*.pth``, ``*.pt``) are never
       loaded, because unpickling can run code; the error says how to convert them.

    Torch-free, so planning may call it. Paths are ``checkpoint / name``, not resolved.
    """
    checkpoint = Path(checkpoint)
    index = checkpoint / INDEX_NAME
    single = checkpoint / SINGLE_NAME
    if index.is_file():
        names = _index_shard_names(index)
        if single.is_file() and names != {SINGLE_NAME}:
            raise SourceError(
                f"{checkpoint} has both {SINGLE_NAME} and {INDEX_NAME} naming other shards; "
                "the two disagree about the weights: remove one"
            )
        for name in sorted(names):
            if not (checkpoint / name).is_file():
                raise SourceError(f"{checkpoint}: shard {name} listed in the index is missing; re-download it")
        return sorted({checkpoint / name for name in names})
    if single.is_file():
        return [single]
    _refuse_pickled(checkpoint)
    raise SourceError(
        f"{checkpoint} holds no safetensors weights (neither {SINGLE_NAME} nor {INDEX_NAME}); convert the "
        "checkpoint with transformers' save_pretrained(safe_serialization=True)"
    )


def _index_shard_names(index: Path) -> set[str]:
    """The normalized shard names of an index's ``weight_map``, each checked to stay inside the checkpoint."""
    return set(_index_weight_map(index).values())


def _index_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> normalized shard name, each checked to stay inside the checkpoint."""
    try:
        text = index.read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as err:
        raise SourceError(f"{index} cannot be read ({err.strerror or err}); check its permissions") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SourceError(f"{index} is not valid JSON ({err}); re-download it") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index} has no 'weight_map' object mapping tensor names to shard files; re-download it")
    return {name: _shard_name(index, name, shard) for name, shard in weight_map.items()}


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a shard's header describes it (validated: its bytes lie inside the file)."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]


def read_tensor_headers(checkpoint: Path) -> dict[str, TensorHeader]:
    """Every weight tensor of ``checkpoint`` by name, from the shards' headers alone.

    Opening a shard validates its header completely (a truncated or empty file, a header
    length past the file, overlapping or out-of-range offsets fail in one line), and a
    tensor the index names must be in the shard the index names: what transformers would
    find out halfway through loading, found out here from a few kilobytes per shard, so
    planning refuses it before any job runs.
    """
    from edgellm_steps.artifacts.safetensors_io import SafetensorsFile

    checkpoint = Path(checkpoint)
    headers: dict[str, TensorHeader] = {}
    for path in weight_files(checkpoint):
        shard = SafetensorsFile(path)
        for name in shard.names():
            headers[name] = TensorHeader(path, shard.dtype(name), shard.shape(name))
    index = checkpoint / INDEX_NAME
    if index.is_file():
        for name, shard_name in _index_weight_map(index).items():
            found = headers.get(name)
            if found is None or found.shard != checkpoint / shard_name:
                where = "no shard" if found is None else f"{found.shard.name}"
                raise SourceError(
                    f"{index} puts tensor {name!r} in {shard_name}, but {where} holds it; the checkpoint is "
                    "incomplete or its shards are mixed: re-download it"
                )
    return headers


def _shard_name(index: Path, tensor: Any, shard: Any) -> str:
    """``shard`` normalized, if it is a plain relative file name that cannot leave the checkpoint directory."""
    if not isinstance(shard, str) or not shard or "\x00" in shard:
        raise SourceError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a shard file name; re-download it")
    normal = os.path.normpath(shard)
    escapes = os.path.isabs(normal) or normal.split(os.sep)[0] == ".."
    if os.path.isabs(shard) or ".." in PurePosixPath(shard).parts or normal == "." or escapes:
        raise SourceError(
            f"{index}: tensor {tensor!r} maps to shard {shard!r}, a path outside the checkpoint directory; "
            "shards must be plain relative file names: re-download the checkpoint"
        )
    return normal


def _refuse_pickled(checkpoint: Path) -> None:
    """Name the pickled weights of a checkpoint without safetensors ones, and say how to convert them."""
    pickled = sorted({p.name for pattern in PICKLED_PATTERNS for p in checkpoint.glob(pattern) if p.is_file()})
    if pickled:
        shown = ", ".join(pickled[:3]) + (f" and {len(pickled) - 3} more" if len(pickled) > 3 else "")
        raise SourceError(
            f"{checkpoint} holds only pickled PyTorch weights ({shown}), which this project does not load "
            f"(unpickling can run code); convert them to safetensors with transformers' "
            "save_pretrained(safe_serialization=True)"
        )


class TensorStore:
    """Named tensors of a checkpoint's safetensors shards, read on demand.

    Opening the store opens (and so validates the header of) every shard named by
    :func:`weight_files`: a damaged checkpoint fails here, with one line, before any work.
    Within :meth:`reading_ahead`, :meth:`read_ahead` starts reading the tensors a caller will ask
    for next (the next decoder layer), so that reading overlaps the work on the current ones.
    """

    def __init__(self, checkpoint: Path) -> None:
        from edgellm_steps.artifacts.safetensors_io import SafetensorsFile

        self.checkpoint = Path(checkpoint)
        self._shard_of: dict[str, SafetensorsFile] = {}
        for path in weight_files(self.checkpoint):
            shard = SafetensorsFile(path)
            for name in shard.names():
                self._shard_of[name] = shard
        self._ahead: ReadAhead | None = None

    @contextlib.contextmanager
    def reading_ahead(self) -> Iterator[None]:
        """Let :meth:`read_ahead` read in a background thread while the block runs."""
        from edgellm_steps.artifacts.read_ahead import ReadAhead

        self._ahead = ReadAhead(self._read, self._nbytes)
        try:
            yield
        finally:
            ahead, self._ahead = self._ahead, None
            ahead.close()

    def read_ahead(self, prefix: str) -> None:
        """Start reading every tensor whose name starts with ``prefix``, in file order (nothing outside
        :meth:`reading_ahead`); :meth:`get` then takes them from the background reads."""
        if self._ahead is None:
            return
        names = [name for name in self._shard_of if name.startswith(prefix)]
        names.sort(key=lambda name: (str(self._shard_of[name].path), self._shard_of[name].offset(name)))
        self._ahead.add(names)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def names(self) -> list[str]:
        """Every tensor name of every shard, in shard order."""
        return list(self._shard_of)

    def _shard(self, name: str) -> SafetensorsFile:
        shard = self._shard_of.get(name)
        if shard is None:
            raise SourceError(
                f"{self.checkpoint}: tensor {name!r} is in no safetensors shard; is the checkpoint whole?"
            )
        return shard

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(name)

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype (``BF16``, ``F8_E4M3``, ...), from the header."""
        return self._shard(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in the checkpoint's dtype."""
        if self._ahead is not None and (tensor := self._ahead.take(name)) is not None:
            return tensor
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        return self._shard(name).read(name)

    def _nbytes(self, name: str) -> int:
        return self._shard(name).nbytes(name)

    def row_chunks(self, name: str, rows: int) -> Iterator[torch.Tensor]:
        """The tensor in slices of ``rows`` leading-dim rows, each read on its own."""
        return self._shard(name).read_row_chunks(name, rows)
