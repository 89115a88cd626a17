"""The tokenizer files a checkpoint must carry, checked before any work and copied byte for byte.

The Edge-LLM runtime tokenizes with ``tokenizer.json`` itself, so that file is the
interface: it is copied from the source through quantize and export, never re-saved
(re-saving through another transformers release has changed Qwen2's normalizer and
pre-tokenizer). A checkpoint without it is refused: transformers would otherwise build
a near-empty tokenizer, calibrate on nothing and export a tokenizer of one entry.
Only the ``tokenizers`` library is used here, so planning can afford the check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm_steps.errors import SourceError

#: The files the runtime reads, required in every source (contract section 4).
RUNTIME_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: A vision-language model's processor files: the LLM export of a VLM carries those the
#: checkpoint has (contract section 4), so a quantized checkpoint keeps them too.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)
#: What export-llm copies into the LLM export, when present.
EXPORT_TOKENIZER_FILES = (*RUNTIME_TOKENIZER_FILES, *PROCESSOR_FILES)
#: Every tokenizer and processor asset a quantized checkpoint carries over from its source, when present.
TOKENIZER_ASSETS = (
    *RUNTIME_TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    *PROCESSOR_FILES,
)
_SAMPLE = "The quick brown fox jumps over the lazy dog; 12 cats, 3 owls."


def check_tokenizer(checkpoint: Path) -> None:
    """Refuse a checkpoint whose tokenizer files are missing or cannot encode text."""
    from tokenizers import Tokenizer

    checkpoint = Path(checkpoint)
    for name in RUNTIME_TOKENIZER_FILES:
        if not (checkpoint / name).is_file():
            raise SourceError(
                f"{checkpoint} has no {name}, which the Edge-LLM runtime needs; save the model's fast tokenizer "
                "into the checkpoint (AutoTokenizer.from_pretrained(...).save_pretrained(<checkpoint>))"
            )
    path = checkpoint / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises bare Exception for any parse error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(
            f"{path} is not a tokenizer the tokenizers library can load ({reason}); re-download it"
        ) from err
    ids = tokenizer.encode(_SAMPLE, add_special_tokens=False).ids
    if len(set(ids)) < 2:
        raise SourceError(
            f"{path} encodes an English sentence to {len(set(ids))} distinct token(s), so it cannot tokenize text; "
            "re-download the checkpoint's tokenizer"
        )


def copy_tokenizer_files(checkpoint: Path, destination: Path, names: tuple[str, ...] = RUNTIME_TOKENIZER_FILES) -> None:
    """Copy the tokenizer files in ``names`` that ``checkpoint`` has into ``destination``, byte for byte."""
    for name in names:
        source = Path(checkpoint) / name
        if source.is_file():
            shutil.copyfile(source, Path(destination) / name)
