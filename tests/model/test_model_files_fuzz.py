"""Hostile model files: truncated or corrupt GGUF and safetensors, config.json not matching the
weights, wrong tokenizers. Each gives a `ModelLoadError` naming the file or field, or a checkpoint
that is consistent with its config; never another exception, never a silently coerced config."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.engine import Engine, EngineError
from streamctx.model.checkpoint import Checkpoint, validate_weights
from streamctx.model.loading import ModelLoadError, load_checkpoint
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba, write_gguf_from_folder

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelfuzz")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    return make_tiny_llama(root / "llama", hidden=16, heads=2, kv_heads=1, layers=1, intermediate=24,
                           tokenizer="bytes", seed=1)


@pytest.fixture(scope="module")
def gguf_file(root: Path, llama: Path) -> Path:
    return write_gguf_from_folder(llama, root / "llama.gguf")


class _Reference:
    """The intact folder's checkpoint (a short repr: hypothesis prints failing examples' arguments)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.weights, self.config = ckpt.weights, ckpt.config

    def __repr__(self) -> str:
        return "<reference checkpoint>"


@pytest.fixture(scope="module")
def reference(llama: Path) -> _Reference:
    return _Reference(load_checkpoint(llama))


def _load(path: Path, cache: Path | None = None) -> Checkpoint | ModelLoadError:
    """`load_checkpoint`'s answer; any exception but `ModelLoadError` fails the test."""
    try:
        ckpt = load_checkpoint(path, cache_dir=cache)
    except ModelLoadError as exc:
        return exc
    validate_weights(ckpt.weights, ckpt.config, source=str(path))  # consistent with its own config
    return ckpt


def _fresh(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


# --- GGUF ------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(frac=st.floats(0, 1, exclude_max=True))
def test_truncated_gguf_anywhere_is_a_clear_error(root: Path, gguf_file: Path, frac: float) -> None:
    gguf_bytes = gguf_file.read_bytes()
    d = _fresh(root, "gguf-cut")
    path = d / "cut.gguf"
    path.write_bytes(gguf_bytes[: int(len(gguf_bytes) * frac)])
    got = _load(path, d / "cache")
    assert isinstance(got, ModelLoadError) and "cut.gguf" in str(got)


@settings(max_examples=15)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupt_gguf_header_is_an_error_or_consistent(root: Path, gguf_file: Path,
                                                       edits: list[tuple[float, int]]) -> None:
    import gguf

    d = _fresh(root, "gguf-bad")
    header = int(gguf.GGUFReader(gguf_file).data_offset)  # metadata + tensor index
    data = bytearray(gguf_file.read_bytes())
    for pos, value in edits:
        data[int(pos * header)] = value
    path = d / "bad.gguf"
    path.write_bytes(bytes(data))
    got = _load(path, d / "cache")
    if isinstance(got, ModelLoadError):
        assert "bad.gguf" in str(got)


def test_gguf_metadata_of_the_wrong_type_is_named(root: Path, llama: Path) -> None:
    d = _fresh(root, "gguf-meta")
    cases = {
        "llama.block_count": lambda w: w.add_string("llama.block_count", "two"),
        "tokenizer.ggml.eos_token_id": lambda w: w.add_string("tokenizer.ggml.eos_token_id", "</s>"),
        "llama.attention.layer_norm_rms_epsilon": lambda w: w.add_string(
            "llama.attention.layer_norm_rms_epsilon", "tiny"),
    }
    for key, edit in cases.items():
        def replace(writer: Any, key: str = key, edit: Any = edit) -> None:
            for kv in writer.kv_data:  # drop the value the folder wrote, then add the hostile one
                kv.pop(key, None)
            edit(writer)
        path = write_gguf_from_folder(llama, d / f"{key}.gguf", edit=replace)
        got = _load(path, d / "cache")
        assert isinstance(got, ModelLoadError) and key in str(got), (key, got)


# --- safetensors -----------------------------------------------------------------------------------


def _folder_copy(src: Path, root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    return d


@settings(max_examples=15)
@given(frac=st.floats(0, 1, exclude_max=True))
def test_truncated_safetensors_anywhere_is_a_clear_error(root: Path, llama: Path, frac: float) -> None:
    d = _folder_copy(llama, root, "st-cut")
    (weights,) = d.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * frac)])
    got = _load(d)
    assert isinstance(got, ModelLoadError) and weights.name in str(got)


@settings(max_examples=15)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupt_safetensors_header_is_an_error_or_consistent(root: Path, llama: Path,
                                                              edits: list[tuple[float, int]]) -> None:
    d = _folder_copy(llama, root, "st-bad")
    (weights,) = d.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for pos, value in edits:
        data[int(pos * header)] = value
    weights.write_bytes(bytes(data))
    got = _load(d)
    if isinstance(got, ModelLoadError):
        assert str(d) in str(got)


# --- config.json against the weights ---------------------------------------------------------------

# config.json key -> (our config attribute, whether the weights' shapes depend on it)
LLAMA_KEYS = {
    "hidden_size": ("hidden_size", True), "num_hidden_layers": ("num_layers", True),
    "num_attention_heads": ("num_heads", True), "num_key_value_heads": ("num_kv_heads", True),
    "intermediate_size": ("intermediate_size", True), "vocab_size": ("vocab_size", True),
    "head_dim": ("head_dim", True), "tie_word_embeddings": ("tie_word_embeddings", True),
    "rms_norm_eps": ("rms_norm_eps", False), "max_position_embeddings": ("max_position_embeddings", False),
    "bos_token_id": ("bos_token_id", False), "eos_token_id": ("eos_token_ids", False),
    "attention_bias": ("attention_bias", True), "mlp_bias": ("mlp_bias", True),
}
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, -1, 2**40, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.sampled_from(["16", "1e-5", "auto"]),
    st.lists(st.integers(-1, 5), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@settings(max_examples=40)
@given(key=st.sampled_from(sorted(LLAMA_KEYS) + ["architectures", "model_type", "rope_scaling", "hidden_act",
                                                  "rope_theta", "sliding_window"]),
       value=HOSTILE, drop=st.booleans())
def test_config_not_matching_the_weights(root: Path, llama: Path, reference: _Reference, key: str, value: Any,
                                         drop: bool) -> None:
    d = _folder_copy(llama, root, "cfg")
    (d / "generation_config.json").unlink(missing_ok=True)  # its EOS would override config.json's
    cfg = json.loads((d / "config.json").read_text())
    original = copy.deepcopy(cfg)
    if drop:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    got = _load(d)
    if isinstance(got, ModelLoadError):
        msg = str(got)
        assert "config.json" in msg or "tensor" in msg or "Config." in msg, msg
        return
    # Loaded: its weights are the folder's, and what it read is exactly what was written.
    for name, t in reference.weights.items():
        assert torch.equal(got.weights[name], t), name
    if key in LLAMA_KEYS and not drop:
        attr, shapes = LLAMA_KEYS[key]
        kept = getattr(got.config, attr)
        if value is None and key in ("head_dim", "num_key_value_heads"):  # null: the default
            assert kept == getattr(reference.config, attr)
            return
        if attr == "eos_token_ids":  # null or []: the tokenizer's EOS
            assert list(kept) == (value if isinstance(value, list) and value else [2] if value in (None, []) else [value])
        else:
            assert kept == value and type(kept) is type(value) or (type(value) is int and type(kept) is float
                                                                    and kept == float(value)), (key, value, kept)
        assert not shapes or value == original.get(key), (key, value)  # a shape-changing value never loads


def test_config_type_errors_name_the_field(root: Path, llama: Path) -> None:
    for key, value, expected in [
        ("hidden_size", "16", "hidden_size must be an integer, got '16'"),
        ("hidden_size", 16.0, "hidden_size must be an integer, got 16.0"),
        ("num_hidden_layers", True, "num_hidden_layers must be an integer, got True"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("eos_token_id", "12", "eos_token_id must be a token id or a list of token ids, got '12'"),
        ("eos_token_id", 10**6, "eos_token_ids holds 1000000, outside the vocabulary"),
        ("rms_norm_eps", "tiny", "rms_norm_eps must be a finite number, got 'tiny'"),
        ("rope_scaling", [1, 2], "rope_scaling must be an object or null"),
        ("architectures", "LlamaForCausalLM", "architectures must be a list of names"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    ]:
        d = _folder_copy(llama, root, "cfg-named")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        got = _load(d)
        assert isinstance(got, ModelLoadError) and expected in str(got), (key, got)


def test_index_and_generation_config_cannot_point_elsewhere(root: Path, llama: Path) -> None:
    d = _folder_copy(llama, root, "idx")
    (weights,) = d.glob("*.safetensors")
    names = list(load_checkpoint(llama).weights)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../x.safetensors" for n in names}}))
    got = _load(d)
    assert isinstance(got, ModelLoadError) and "not a .safetensors file in this folder" in str(got)
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    assert "no 'weight_map'" in str(_load(d))
    (d / "model.safetensors.index.json").unlink()
    (d / "generation_config.json").write_text('["eos"]')
    assert "expected a JSON object" in str(_load(d))
    (d / "generation_config.json").write_text('{"eos_token_id": "2"}')
    assert "eos_token_id must be a token id" in str(_load(d))


@settings(max_examples=10)
@given(data=st.data())
def test_missing_or_renamed_tensors_are_named(root: Path, llama: Path, reference: _Reference, data) -> None:
    from safetensors.torch import save_file

    d = _folder_copy(llama, root, "tensors")
    (weights,) = d.glob("*.safetensors")
    tensors = dict(reference.weights)
    victim = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["drop", "rename", "reshape", "extra"]))
    if action == "drop":
        del tensors[victim]
    elif action == "rename":
        tensors[victim + ".x"] = tensors.pop(victim)
    elif action == "reshape":
        tensors[victim] = torch.zeros(tensors[victim].numel() + 1)
    else:
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights))
    got = _load(d)
    assert isinstance(got, ModelLoadError)
    assert (victim if action != "extra" else "model.layers.9.mlp.up_proj.weight") in str(got)


# --- tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "{}", "[]", '{"model": {"type": "Nope"}}', "\x00\xff garbage", '{"version"'])
def test_broken_tokenizer_is_a_clear_error(root: Path, llama: Path, content: str) -> None:
    d = _folder_copy(llama, root, "tok")
    (d / "tokenizer.json").write_text(content, encoding="utf-8", errors="surrogateescape")
    got = _load(d)
    assert isinstance(got, ModelLoadError) and "tokenizer.json" in str(got)


def test_tokenizer_larger_than_the_model_is_refused_at_feed(root: Path) -> None:
    # The SmolLM2 tokenizer (49152 ids) on a model with 269 embedding rows: text that encodes to an
    # id past the embedding is refused with the id named, never an index error or a wrong row.
    folder = make_tiny_llama(root / "small-vocab", hidden=16, heads=2, kv_heads=1, layers=1, intermediate=24,
                             vocab_size=269, tokenizer="smollm2", seed=2)
    engine = Engine.load(folder)
    with pytest.raises(EngineError, match=r"token id \d+ is out of the vocabulary \[0, 269\)"):
        engine.session("s").feed("A sentence with ordinary words in it.")


def test_mamba_config_types_are_checked(root: Path) -> None:
    folder = make_tiny_mamba(root / "mamba", hidden=16, layers=1, vocab_size=64, tokenizer="bytes")
    for key, value in [("state_size", "16"), ("time_step_rank", 1.5), ("use_conv_bias", 1), ("expand", None)]:
        d = _folder_copy(folder, root, "mamba-cfg")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
        got = _load(d)
        assert isinstance(got, ModelLoadError) and key in str(got), (key, got)


@pytest.mark.parametrize("op", ["open", "replace", "mkdir"])
def test_unwritable_gguf_cache_still_loads_and_leaves_nothing(root: Path, gguf_file: Path, reference: _Reference,
                                                              op: str, caplog) -> None:
    import errno

    from tests.fixtures.faulty_fs import Faults, files_under, inject_faults

    cache = _fresh(root, f"cache-{op}")
    with inject_faults(cache, Faults(error=errno.ENOSPC if op != "mkdir" else errno.EACCES, on_call=1,
                                     sticky=True, ops={op})) as faults:
        got = _load(gguf_file, cache)
    assert isinstance(got, Checkpoint) and faults.injected
    for name, t in reference.weights.items():
        assert torch.equal(got.weights[name], t), name
    assert "could not cache dequantized weights" in caplog.text
    assert files_under(cache) == []  # no temporary or partial entry
