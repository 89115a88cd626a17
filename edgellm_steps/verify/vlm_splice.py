"""How the runtime feeds a vision-language model's language graph the vision tower's rows (contract 3.6).

The runtime rewrites each image placeholder token to id ``vocab_size + k``, k counting image
tokens across the whole batch in order, and looks every id up in one table: the text embedding
for ids below ``vocab_size``, vision ``output`` row k above. A Qwen3-VL graph also takes its
deepstack inputs, each [B, S, H]: deepstack row k at the token that took image row k, zeros
everywhere else, and zeros for every decode step. Verification builds the feeds the same way,
independently of the exporter; tests check them against transformers' own placeholder mask,
``masked_scatter`` and deepstack addition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def runtime_token_ids(batch_ids: Sequence[Sequence[int]], image_token_id: int, vocab_size: int) -> np.ndarray:
    """[B, S] ids as the runtime looks them up: image token k of the batch (row-major) becomes vocab_size + k.

    Sequences are right-padded with 0 to the longest.
    """
    length = max(len(ids) for ids in batch_ids)
    padded = np.zeros((len(batch_ids), length), np.int64)
    for b, ids in enumerate(batch_ids):
        padded[b, : len(ids)] = ids
    image = np.zeros_like(padded, dtype=bool)
    for b, ids in enumerate(batch_ids):
        image[b, : len(ids)] = np.asarray(ids) == image_token_id
    padded[image] = vocab_size + np.arange(int(image.sum()))
    return padded


def spliced_embeddings(runtime_ids: np.ndarray, embedding: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
    """[B, S, H] embeddings: text rows of ``embedding``, vision row k where the id is vocab_size + k."""
    vocab = embedding.shape[0]
    image = runtime_ids >= vocab
    if int(image.sum()) != len(image_rows):
        raise ValueError(f"{int(image.sum())} image tokens but {len(image_rows)} vision rows")
    out = embedding[np.where(image, 0, runtime_ids)].astype(np.float32)
    out[image] = np.asarray(image_rows, np.float32)[runtime_ids[image] - vocab]
    return out


def deepstack_feeds(runtime_ids: np.ndarray, vocab_size: int, deepstack_rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The deepstack inputs of a prefill: [B, S, H] each, row k at the token of id vocab_size + k, zeros elsewhere."""
    image = runtime_ids >= vocab_size
    feeds = []
    for rows in deepstack_rows:
        rows = np.asarray(rows, np.float32)
        full = np.zeros((*runtime_ids.shape, rows.shape[-1]), np.float32)
        full[image] = rows[runtime_ids[image] - vocab_size]
        feeds.append(full)
    return feeds


def decode_deepstack_feeds(batch: int, tokens: int, hidden: int, count: int) -> list[np.ndarray]:
    """The deepstack inputs of a decode step: zeros ([B, tokens, H] each), as the runtime binds them."""
    return [np.zeros((batch, tokens, hidden), np.float32) for _ in range(count)]
