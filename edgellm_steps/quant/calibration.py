"""Calibration text: offline by default, local files, or a HF dataset when online.

The default corpus needs no download: it is the docstrings of the Python
standard library on this machine, read with ``ast`` (nothing is imported),
a few megabytes of technical English prose. Samples are cut from the
tokenized stream of the corpus, so every sample has exactly ``max_tokens``
tokens while the corpus lasts, and the corpus is cycled if it is short.
Calibration reads the built-in corpus lazily: parsing all of it takes seconds,
and a calibration of a few hundred samples needs its first files only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgellm_steps.errors import EdgeLLMError

BUILTIN = "builtin"
_MIN_WORDS = 12


#: Directories of the standard library whose files are not its prose (tests, installed packages, demos).
_SKIPPED_DIRS = frozenset({"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"})


def _stdlib_sources(stdlib: Path) -> list[Path]:
    """The standard library's ``.py`` files in path order (component by component), skipped directories never
    entered: walking only what is read keeps this a fraction of a second (an installed site-packages is large)."""
    found: list[tuple[str, ...]] = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        parts = Path(root).relative_to(stdlib).parts
        found += [(*parts, name) for name in files if name.endswith(".py")]
    return [stdlib.joinpath(*parts) for parts in sorted(found)]


#: One built-in paragraph in this many is held out: calibration never reads it, the accuracy report reads only
#: those (about 60 KB of prose, some 15k tokens).
HELD_OUT_EVERY = 20
CALIBRATION_SPLIT = "calibration"
HELD_OUT_SPLIT = "held-out"


def iter_builtin_corpus(limit_chars: int = 8_000_000, split: str | None = None) -> Iterator[str]:
    """Paragraphs of the standard library's docstrings, in a stable order, parsed as they are read.

    ``split`` keeps the calibration paragraphs or the held-out ones (every :data:`HELD_OUT_EVERY`-th);
    None keeps them all (what reduce-vocab counts and the demo tokenizer learns from).
    """
    if split not in (None, CALIBRATION_SPLIT, HELD_OUT_SPLIT):
        raise ValueError(f"unknown corpus split {split!r}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    index = 0
    for path in _stdlib_sources(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text.split()) < _MIN_WORDS:
                    continue
                held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
                index += 1
                total += len(text)
                if split is None or held_out == (split == HELD_OUT_SPLIT):
                    yield text
        if total >= limit_chars:
            break


def builtin_corpus(limit_chars: int = 8_000_000) -> list[str]:
    """The whole built-in corpus (what reduce-vocab counts token frequencies over)."""
    return list(iter_builtin_corpus(limit_chars))


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EdgeLLMError(f"{path}:{number} is not JSON ({err}); JSONL needs one object per line") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EdgeLLMError(f"{path}:{number} has no string 'text' field; each JSONL line needs one")
            texts.append(record["text"])
        return texts
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def load_corpus(source: str | None) -> list[str]:
    """Texts from ``source``: ``builtin``/None, a .txt/.jsonl file, a directory of them, or a HF dataset id."""
    if source in (None, "", BUILTIN):
        return builtin_corpus()
    path = Path(source).expanduser()
    if path.is_file():
        texts = _read_file(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES)
        if not files:
            raise EdgeLLMError(f"calibration directory {path} has no .txt or .jsonl files; add some or pick another")
        texts = [t for f in files for t in _read_file(f)]
    else:
        texts = _load_hub_dataset(source)
    if not texts:
        raise EdgeLLMError(f"calibration corpus {source} is empty; give it some text")
    return texts


#: Local corpus files by suffix; a source named so (or like a path) that does not exist is a typo, not a hub id.
CORPUS_SUFFIXES = (".txt", ".jsonl")


def _no_datasets(name: str) -> str:
    return (
        f"calibration corpus '{name}' is neither a file nor a directory; to use a HF dataset id, "
        "`pip install datasets` (and be online), or pass a local .txt/.jsonl file"
    )


def check_corpus_source(source: str | None) -> None:
    """What planning can know of a corpus source: a local one exists and holds text; a hub id can be loaded.

    A local file or directory is read (and so validated) now, so a missing, empty or malformed
    corpus fails before any job; a hub dataset is fetched only by the step.
    """
    if source in (None, "", BUILTIN):
        return
    path = Path(source).expanduser()
    if path.exists():
        load_corpus(source)
        return
    if path.suffix in CORPUS_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise EdgeLLMError(f"corpus '{source}' does not exist (relative paths start at the work directory)")
    if importlib.util.find_spec("datasets") is None:
        raise EdgeLLMError(_no_datasets(source))


def _load_hub_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise EdgeLLMError(_no_datasets(name)) from err
    dataset = datasets.load_dataset(name, split="train")
    column = "text" if "text" in dataset.column_names else dataset.column_names[0]
    return [row[column] for row in dataset if isinstance(row[column], str)]


def corpus_texts(source: str | None) -> Iterable[str]:
    """Calibration text: :func:`load_corpus`, or the built-in corpus's calibration split, read lazily (samples
    need its first paragraphs)."""
    return iter_builtin_corpus(split=CALIBRATION_SPLIT) if source in (None, "", BUILTIN) else load_corpus(source)


def held_out_texts(source: str | None) -> Iterable[str]:
    """Text to measure accuracy on: the built-in corpus's held-out split, or a local corpus of the user's."""
    return iter_builtin_corpus(split=HELD_OUT_SPLIT) if source in (None, "", BUILTIN) else load_corpus(source)


def calibration_samples(tokenizer, texts: Iterable[str], num_samples: int, max_tokens: int) -> list[list[int]]:
    """``num_samples`` token lists of ``max_tokens`` tokens cut from the corpus stream."""
    if num_samples < 1 or max_tokens < 1:
        raise EdgeLLMError("calibration needs at least one sample of at least one token")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    needed = num_samples * max_tokens
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= needed:
            break
    if not stream:
        raise EdgeLLMError("the calibration corpus tokenizes to nothing")
    while len(stream) < needed:
        stream += stream[: needed - len(stream)]
    return [stream[i * max_tokens : (i + 1) * max_tokens] for i in range(num_samples)]


def calibration_batches(checkpoint: Path, source: str | None, num_samples: int, max_tokens: int, batch: int) -> list:
    """Token id tensors [batch, max_tokens] cut from ``source`` with ``checkpoint``'s tokenizer."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    samples = calibration_samples(tokenizer, corpus_texts(source), num_samples, max_tokens)
    return [torch.tensor(samples[i : i + batch]) for i in range(0, len(samples), batch)]


def calibration_record(source: str | None, num_samples: int, max_tokens: int, batch: int, device: str) -> dict:
    """How a quantized checkpoint was calibrated, as its ``edgellm_quantization.json`` records it."""
    return {
        "corpus": source or BUILTIN,
        "samples": num_samples,
        "max_tokens": max_tokens,
        "batch_size": batch,
        "device": device,
    }
