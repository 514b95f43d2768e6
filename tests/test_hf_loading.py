"""`seqdec.checkpoints.hf` without torch: config mapping, round trips, errors.

Checkpoints are written by hand (`hf_fixtures.write_checkpoint`: safetensors
via `safetensors.numpy`, a hand-written config.json) from random HF-named
tensors, so none of these tests needs torch or transformers.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest

import hf_fixtures
from seqdec.checkpoints.convert import CheckpointError, model_to_hf_tensors
from seqdec.checkpoints.hf import config_from_hf, load_hf, read_hf_tensors
from seqdec.models.config import TransformerConfig

TINY = TransformerConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
    max_position_embeddings=128)
TINY_CONFIGS = {
    "llama": TINY,
    "llama_tied_llama3": TINY.replace(
        tie_embeddings=True, rope_theta=5e5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=64.0)),
    "qwen2_bias": TINY.replace(qkv_bias=True, tie_embeddings=True,
                               architecture="Qwen2ForCausalLM"),
    "mistral_window": TINY.replace(sliding_window=16,
                                   architecture="MistralForCausalLM"),
}


def _llama_json(**changes):
  """A minimal transformers-5 style Llama config.json dict."""
  cfg = hf_fixtures.hf_config_dict(TINY)
  cfg.update(changes)
  return cfg


def _write(tmp_path, config=TINY, **kwargs):
  """Writes a random TINY-like checkpoint; returns (dir, tensors)."""
  tensors = hf_fixtures.random_hf_tensors(config, seed=3)
  path = hf_fixtures.write_checkpoint(str(tmp_path / "ckpt"), config, tensors,
                                      **kwargs)
  return path, tensors


def _assert_same_tensors(model, tensors):
  got = model_to_hf_tensors(model)
  expected = dict(tensors)
  if model.config.tie_embeddings:
    expected.pop("lm_head.weight", None)
  assert sorted(got) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(got[name], np.asarray(array, np.float32),
                                  err_msg=name)


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("num_shards", [None, 3])
def test_round_trip(tmp_path, name, num_shards):
  config = TINY_CONFIGS[name]
  path, tensors = _write(tmp_path, config, num_shards=num_shards)
  model, tokenizer = load_hf(path)
  assert tokenizer is None
  assert model.config == config
  _assert_same_tensors(model, tensors)
  if num_shards:
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    assert len(read_hf_tensors(path)) == len(tensors)


def test_blocks_of_memory_mapped_tensors_equal_slices_of_the_whole(tmp_path):
  """`Parts.block(index)` (what a sharded load reads per device) equals
  the whole packed parameter sliced, for every parameter and for blocks
  that cut through the fused q/k/v and gate/up parts."""
  from seqdec.checkpoints import convert  # pylint: disable=g-import-not-at-top
  config = TINY_CONFIGS["qwen2_bias"]
  path, _ = _write(tmp_path, config)
  lazy = read_hf_tensors(path)
  assert all(isinstance(x.base, np.memmap) or isinstance(x, np.memmap)
             for x in lazy.values())
  rng = np.random.default_rng(0)
  for name, (names, pack, _) in convert.param_specs(config).items():
    parts = pack(config, *[lazy[n] for n in names])
    whole = parts.block()
    assert whole.shape == parts.shape, name
    for _ in range(4):
      index = []
      for n in whole.shape:
        lo = int(rng.integers(0, n))
        index.append(slice(lo, int(rng.integers(lo, n + 1))))
      np.testing.assert_array_equal(parts.block(tuple(index)),
                                    whole[tuple(index)], err_msg=name)


def test_round_trip_old_rope_form_gives_same_config(tmp_path):
  config = TINY_CONFIGS["llama_tied_llama3"]
  tensors = hf_fixtures.random_hf_tensors(config)
  path = hf_fixtures.write_checkpoint(
      str(tmp_path), hf_fixtures.hf_config_dict(config, rope_form="old"),
      tensors)
  model, _ = load_hf(path)
  assert model.config == config


def test_bfloat16_checkpoint(tmp_path):
  tensors = hf_fixtures.random_hf_tensors(TINY, dtype=ml_dtypes.bfloat16)
  path = hf_fixtures.write_checkpoint(str(tmp_path), TINY, tensors)
  assert read_hf_tensors(path)["model.norm.weight"].dtype == ml_dtypes.bfloat16
  model, _ = load_hf(path)  # float32 parameters, exact upcast
  _assert_same_tensors(model, tensors)
  model16, _ = load_hf(path, dtype="bfloat16")
  assert model16.embed[...].dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(
      np.asarray(model16.embed[...]), tensors["model.embed_tokens.weight"])


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
  config = TINY.replace(tie_embeddings=True)
  tensors = hf_fixtures.random_hf_tensors(config)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  path = hf_fixtures.write_checkpoint(str(tmp_path), config, tensors)
  model, _ = load_hf(path)
  assert model.lm_head is None


def test_tokenizer_is_loaded_when_present(tmp_path):
  path, _ = _write(tmp_path, tokenizer=True)
  _, tokenizer = load_hf(path)
  assert tokenizer is not None
  assert tokenizer.bos_id == 256 and 257 in tokenizer.eos_ids
  assert tokenizer.decode(tokenizer.encode("héllo", add_bos=False)) == "héllo"


def test_loaded_model_runs(tmp_path):
  path, _ = _write(tmp_path)
  model, _ = load_hf(path)
  tokens = np.arange(10, dtype=np.int32)[None] % TINY.vocab_size
  logits, _ = model(tokens, np.arange(10, dtype=np.int32)[None],
                    model.init_cache(1, 10))
  assert logits.shape == (1, 10, TINY.vocab_size)
  assert np.all(np.isfinite(np.asarray(logits)))


# ------------------------------------------------------------ config mapping


def test_config_defaults():
  cfg = _llama_json()
  for key in ("head_dim", "num_key_value_heads", "rope_parameters",
              "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings",
              "hidden_act"):
    del cfg[key]
  c = config_from_hf(cfg)
  assert c.head_dim == 32 // 4 and c.num_kv_heads == 4
  assert c.rope_theta == 10000.0 and c.rope_scaling is None
  assert not c.tie_embeddings and c.sliding_window is None
  assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 2048


def test_config_model_type_without_architectures():
  cfg = _llama_json(model_type="qwen2")
  del cfg["architectures"]
  assert config_from_hf(cfg).architecture == "Qwen2ForCausalLM"


def test_config_dtypes():
  c = config_from_hf(_llama_json(), dtype="bfloat16")
  assert (c.dtype, c.param_dtype) == ("bfloat16", "bfloat16")
  c = config_from_hf(_llama_json(), dtype="bfloat16", param_dtype="float32")
  assert (c.dtype, c.param_dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("rope,expected", [
    # transformers 5.x
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
     (1e6, None)),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4,
                               factor=2)),
     (1e4, dict(rope_type="linear", factor=2.0))),
    # transformers 4.x, both spellings of the type key
    (dict(rope_theta=5e5, rope_scaling=None), (5e5, None)),
    (dict(rope_theta=5e5, rope_scaling=dict(type="linear", factor=4.0)),
     (5e5, dict(rope_type="linear", factor=4.0))),
    (dict(rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192)),
     (5e5, dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192.0))),
])
def test_config_rope_forms(rope, expected):
  cfg = _llama_json()
  del cfg["rope_parameters"]
  cfg.update(rope)
  c = config_from_hf(cfg)
  assert (c.rope_theta, c.rope_scaling_dict) == expected


@pytest.mark.parametrize("changes,sliding_window", [
    (dict(use_sliding_window=False, sliding_window=32768), None),
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0),
     64),
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=2),
     None),  # HF: layer i slides iff i >= max_window_layers -> none here
    (dict(use_sliding_window=True, sliding_window=64,
          layer_types=["sliding_attention"] * 2), 64),
])
def test_config_qwen2_sliding_window(changes, sliding_window):
  cfg = _llama_json(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                    **changes)
  c = config_from_hf(cfg)
  assert c.qkv_bias and c.sliding_window == sliding_window


@pytest.mark.parametrize("window", [None, 4096])
def test_config_mistral_sliding_window(window):
  cfg = _llama_json(architectures=["MistralForCausalLM"],
                    model_type="mistral", sliding_window=window)
  assert config_from_hf(cfg).sliding_window == window


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"),
    # (attention_bias and mlp_bias load now: test_hf_parity.py
    # [llama_attn_mlp_bias]; Gemma 3's refusals: test_gemma.py)
    (dict(architectures=None, model_type="gemma3"),
     "Gemma 3 multimodal configs"),
    (dict(hidden_act="gelu"), "activation 'gelu' is not supported"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     "unsupported RoPE type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling=dict(type="dynamic",
                                                   factor=2.0)),
     "unsupported RoPE type 'dynamic'"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4,
                               factor=8.0)),
     "needs 'low_freq_factor'"),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4)),
     "needs 'factor'"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
          use_sliding_window=True, sliding_window=64, max_window_layers=1),
     "sliding-window attention on 1 of 2 layers"),
    (dict(num_key_value_heads=3), "multiple of num_kv_heads"),
    (dict(vocab_size=None), "'vocab_size'"),
    (dict(head_dim=None, hidden_size=30), "no head_dim"),
])
def test_config_errors(changes, message):
  with pytest.raises(CheckpointError) as info:
    config_from_hf(_llama_json(**changes))
  assert message in str(info.value)


# -------------------------------------------------------------------- errors


def _load_error(path) -> str:
  with pytest.raises(CheckpointError) as info:
    load_hf(path)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_error_missing_directory(tmp_path):
  missing = str(tmp_path / "nope")
  message = _load_error(missing)
  assert missing in message and "does not exist" in message


def test_error_path_is_a_file(tmp_path):
  f = tmp_path / "file.txt"
  f.write_text("x")
  assert "is not a directory" in _load_error(str(f))


def test_error_missing_config(tmp_path):
  path, _ = _write(tmp_path)
  os.remove(os.path.join(path, "config.json"))
  message = _load_error(path)
  assert "no config.json" in message and path in message


def test_error_invalid_config_json(tmp_path):
  path, _ = _write(tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"architectures": ["LlamaForCausalLM"],')
  message = _load_error(path)
  assert "config.json is not valid JSON" in message


def test_error_unknown_architecture(tmp_path):
  path, _ = _write(tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_llama_json(architectures=["FalconForCausalLM"],
                          model_type="falcon"), f)
  message = _load_error(path)
  assert "config.json" in message
  assert "FalconForCausalLM" in message and "LlamaForCausalLM" in message


def test_error_no_weights(tmp_path):
  path, _ = _write(tmp_path)
  os.remove(os.path.join(path, "model.safetensors"))
  message = _load_error(path)
  assert "no model.safetensors or model.safetensors.index.json" in message
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"\0")
  assert "only safetensors is supported" in _load_error(path)


def test_error_missing_shard(tmp_path):
  path, _ = _write(tmp_path, num_shards=3)
  os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
  message = _load_error(path)
  assert "model-00002-of-00003.safetensors" in message
  assert "does not exist" in message


def test_error_index_names_tensor_absent_from_shard(tmp_path):
  path, _ = _write(tmp_path, num_shards=2)
  index_path = os.path.join(path, "model.safetensors.index.json")
  with open(index_path) as f:
    index = json.load(f)
  index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = (
      "model-00001-of-00002.safetensors")
  with open(index_path, "w") as f:
    json.dump(index, f)
  message = _load_error(path)
  assert "model-00001-of-00002.safetensors lacks 1 tensors" in message
  assert "model.layers.9.mlp.up_proj.weight" in message


@pytest.mark.parametrize("num_shards", [None, 2])
@pytest.mark.parametrize("keep", [0.5, 0.0, 10])
def test_error_truncated_safetensors(tmp_path, num_shards, keep):
  path, _ = _write(tmp_path, num_shards=num_shards)
  name = ("model.safetensors" if num_shards is None
          else "model-00002-of-00002.safetensors")
  file = os.path.join(path, name)
  with open(file, "rb") as f:
    data = f.read()
  size = int(len(data) * keep) if isinstance(keep, float) else keep
  with open(file, "wb") as f:
    f.write(data[:size])
  message = _load_error(path)
  assert file in message and "truncated or corrupt" in message


def test_error_missing_tensor(tmp_path):
  config = TINY
  tensors = hf_fixtures.random_hf_tensors(config)
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  path = hf_fixtures.write_checkpoint(str(tmp_path), config, tensors)
  message = _load_error(path)
  assert "model.safetensors" in message
  assert ("missing 1 tensors" in message
          and "model.layers.1.self_attn.k_proj.weight" in message)


def test_error_wrong_shape(tmp_path):
  tensors = hf_fixtures.random_hf_tensors(TINY)
  tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((32, 40),
                                                            np.float32)
  path = hf_fixtures.write_checkpoint(str(tmp_path), TINY, tensors)
  message = _load_error(path)
  assert "model.layers.0.mlp.down_proj.weight" in message
  assert "shape (32, 40)" in message and "implies (32, 48)" in message


def test_error_unused_tensor(tmp_path):
  """A Llama checkpoint with q/k/v biases but a config without them."""
  tensors = hf_fixtures.random_hf_tensors(TINY)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
  path = hf_fixtures.write_checkpoint(str(tmp_path), TINY, tensors)
  message = _load_error(path)
  assert "does not use" in message and "q_proj.bias" in message
