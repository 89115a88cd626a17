"""edgellm-reduce-vocab and export-llm --reduced_vocab_dir (contract 4, vocab_map)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgellm_steps.errors import SourceError
from edgellm_steps.export.export_llm import export_llm
from edgellm_steps.export.reduce_vocab import choose_vocab, reduce_vocab
from edgellm_steps.models.demo import make_eagle3_draft
from edgellm_steps.verify.reference import LLMRunner

SIZE = 120


def test_choose_vocab_keeps_required_then_the_most_frequent():
    counts = Counter({5: 10, 7: 10, 3: 1, 9: 50, 2: 0})
    assert choose_vocab(12, 4, {0, 1}, counts).tolist() == [0, 1, 5, 9]  # ties by lower id: 5 before 7
    assert choose_vocab(12, 9, {11}, counts).dtype == np.int32
    assert choose_vocab(12, 9, {11}, counts).tolist() == [0, 1, 2, 3, 4, 5, 7, 9, 11]  # unseen ids fill by id
    with pytest.raises(SourceError, match="cannot hold the 3 ids it must keep"):
        choose_vocab(12, 2, {0, 1, 2}, counts)


@pytest.fixture(scope="module")
def reduced(checkpoint_factory, tmp_path_factory):
    base = checkpoint_factory("qwen2")
    root = tmp_path_factory.mktemp("reduced")
    draft = make_eagle3_draft(root / "draft", base)
    reduce_vocab(base, root / "vocab", size=SIZE, draft_dir=draft)
    export_llm(base, root / "reduced", reduced_vocab_dir=root / "vocab")
    export_llm(base, root / "full")
    return base, draft, root


def test_the_map_keeps_special_tokens_and_every_id_the_draft_reaches(reduced):
    base, draft, root = reduced
    ids = load_file(str(root / "vocab/vocab_map.safetensors"))["vocab_map"]
    assert ids.dtype == np.int32 and len(ids) == SIZE and np.all(np.diff(ids) > 0)
    added = json.loads((base / "tokenizer.json").read_text())["added_tokens"]
    assert {t["id"] for t in added if t["special"]} <= set(ids.tolist())
    d2t = load_file(str(draft / "model.safetensors"))["d2t"]
    assert set((np.arange(len(d2t)) + d2t).tolist()) <= set(ids.tolist())


def test_reduced_logits_equal_the_full_exports_at_the_kept_ids(reduced):
    import torch
    import transformers

    from edgellm_steps.verify.parity import hf_rope_table

    base, _, root = reduced
    config = json.loads((root / "reduced/config.json").read_text())
    assert (
        config["reduced_vocab_size"] == SIZE
        and config["vocab_size"] == json.loads((base / "config.json").read_text())["vocab_size"]
    )
    ids = load_file(str(root / "reduced/vocab_map.safetensors"))["vocab_map"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    rope = hf_rope_table(model, 16)
    prompt = np.random.default_rng(0).integers(0, config["vocab_size"], 6).tolist()
    full = LLMRunner(root / "full", rope, batch=1, capacity=16).step([prompt], all_logits=True)
    small = LLMRunner(root / "reduced", rope, batch=1, capacity=16).step([prompt], all_logits=True)
    assert small.shape[-1] == SIZE
    np.testing.assert_allclose(small, full[..., ids], rtol=0, atol=1e-3 * np.abs(full).max())


def test_a_map_outside_the_vocabulary_is_refused(checkpoint_factory, tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "vocab").mkdir()
    save_file({"vocab_map": np.array([1, 3, 100000], np.int32)}, str(tmp_path / "vocab/vocab_map.safetensors"))
    with pytest.raises(SourceError, match="ascending, unique and below the vocabulary size"):
        export_llm(checkpoint_factory("qwen2"), tmp_path / "out", reduced_vocab_dir=tmp_path / "vocab")
    assert not (tmp_path / "out").exists()


def test_verify_onnx_checks_a_reduced_export_at_its_kept_ids(reduced):
    from edgellm_steps.verify.verify_onnx import verify_onnx

    base, _, root = reduced
    summary = verify_onnx(root / "reduced", base)
    assert summary["passed"], summary
