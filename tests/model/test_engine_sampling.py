"""Token selection: greedy, top-k and top-p filters, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from streamctx.model.sampling import Sampler, SamplingParams


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(SamplingParams())(logits) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_greedy_takes_torch_argmax_first_maximum_in_every_dtype(dtype: torch.dtype) -> None:
    """The CPU fast path (numpy) and torch agree, ties included (the first maximum wins)."""
    g = torch.Generator().manual_seed(0)
    greedy = Sampler(SamplingParams())
    for _ in range(20):
        logits = torch.randint(0, 8, (1000,), generator=g).to(dtype)  # many ties at the maximum
        assert greedy(logits) == int(torch.argmax(logits))
    view = torch.randn(4, 50, generator=g).to(dtype)[2]  # a row of a batch's logits
    assert greedy(view) == int(torch.argmax(view))


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, -2.0, 1.0, 0.0])
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    assert {s(probs.log()) for _ in range(300)} == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    tiny = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=1))
    assert {tiny(probs.log()) for _ in range(50)} == {0}


def test_seeded_sampler_is_reproducible_and_matches_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0])
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7)) for _ in range(2)]
    a = [draws[0](logits) for _ in range(2000)]
    b = [draws[1](logits) for _ in range(2000)]
    assert a == b
    freq = torch.bincount(torch.tensor(a), minlength=3).float() / len(a)
    assert torch.allclose(freq, logits.softmax(-1), atol=0.04)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_parameters_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
