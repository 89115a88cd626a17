"""A tiny checkpoint trained for a few seconds on the built-in corpus, so its numbers mean something.

A random-weight model predicts nearly uniformly: its perplexity is about its vocabulary size whatever the
text, and quantization moves it by a fraction of a percent, so an accuracy figure (or a check of one) cannot
tell a right answer from a wrong one. A few hundred steps of next-token training on the corpus's calibration
split give peaked predictions: perplexity well below the vocabulary, clear differences between precisions.
Only the language model learns (text only); a vision tower keeps its weights. Deterministic for a seed on
one machine (one thread).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def train_briefly(
    checkpoint: str | Path,
    output_dir: str | Path,
    texts: Iterable[str],
    *,
    steps: int = 200,
    batch: int = 8,
    tokens: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> Path:
    """Copy ``checkpoint`` to ``output_dir`` with its weights trained ``steps`` AdamW steps on ``texts`` (the
    calibration corpus: its stream of tokens, paragraphs joined by EOS, cut into ``batch`` x ``tokens`` batches)."""
    import torch
    import transformers

    from edgellm_steps.artifacts.sources import read_hf_config
    from edgellm_steps.models.families import family_for

    source, output = Path(checkpoint), Path(output_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= steps * batch * tokens:
            break
    stream *= -(-steps * batch * tokens // len(stream))  # a short text is repeated
    samples = [stream[i * tokens : (i + 1) * tokens] for i in range(steps * batch)]
    auto_class = getattr(transformers, family_for(read_hf_config(source), where=str(source)).hf_auto_class)
    model = auto_class.from_pretrained(str(source), dtype=torch.float32)
    stored = transformers.AutoConfig.from_pretrained(str(source)).dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        model.train()
        for step in range(steps):
            ids = torch.tensor(samples[step * batch : (step + 1) * batch])
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == steps - 1:
                log.info("step %d: loss %.3f", step, loss.item())
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(source, output)
    model.eval().to(stored or torch.float16).save_pretrained(str(output))
    return output
