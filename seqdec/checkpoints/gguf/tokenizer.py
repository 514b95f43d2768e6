"""The tokenizer a GGUF describes, rebuilt with `tokenizers` (no transformers).

Two kinds: byte-level BPE (`tokenizer.ggml.model` = 'gpt2'; the
pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` families), and
Gemma's SentencePiece-style BPE with byte fallback (`tokenizer.ggml.model`
= 'llama' in a 'gemma3' file).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import tokenizers
from tokenizers import (AddedToken, Regex, decoders, models, normalizers,
                        pre_tokenizers)

from seqdec.checkpoints.convert import CheckpointError
from seqdec.checkpoints.gguf.reader import get_field
from seqdec.tokenizer import Tokenizer, bytes_to_unicode

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL = 1, 2, 3
TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 4, 5, 6


class GGUFTokenizer(Tokenizer):
  """A `Tokenizer` that also records the GGUF's pad and unknown ids.

  Attributes:
    pad_id: `tokenizer.ggml.padding_token_id` or None.
    unk_id: `tokenizer.ggml.unknown_token_id` or None.
    pre_tokenizer_type: `tokenizer.ggml.pre`, for the record.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *,
               pad_id: Optional[int] = None, unk_id: Optional[int] = None,
               pre_tokenizer_type: Optional[str] = None, **kwargs):
    super().__init__(backend, **kwargs)
    self.pad_id = pad_id
    self.unk_id = unk_id
    self.pre_tokenizer_type = pre_tokenizer_type


# GPT-2's pre-tokenizer regex is what ByteLevel(use_regex=True) applies.
# llama.cpp splits `tokenizer.ggml.pre` families as follows (llama-vocab.cpp):
# these first isolate every single digit (\p{N}) and then apply GPT-2's regex,
# which is HF's Sequence[Digits(individual_digits=True), ByteLevel] -- the
# pre-tokenizer of SmolLM2's (StarCoder-derived) tokenizer.json.
_DIGITS_THEN_GPT2 = frozenset({
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
    "minerva"})
_GPT2 = frozenset({"gpt-2", "gpt2", "default", "mpt", "olmo", "jais"})
# Llama 3's split, applied before a regex-free ByteLevel.
_LLAMA3 = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx",
                     "falcon3"})
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: Optional[str], transformers_compat: bool):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        trim_offsets=True, use_regex=True)
  if pre is None or pre in _GPT2:
    return byte_level
  if pre in _DIGITS_THEN_GPT2:
    if transformers_compat:
      # transformers' GGUF tokenizer (5.x) knows no split for these types and
      # falls back to plain GPT-2 splitting.
      return byte_level
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _LLAMA3:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                 use_regex=False)])
  raise CheckpointError(
      f"unsupported tokenizer.ggml.pre {pre!r}; seqdec knows "
      f"{sorted(_GPT2 | _DIGITS_THEN_GPT2 | _LLAMA3)}")


_BYTE_CHARS = bytes_to_unicode()
_ALPHABET = frozenset(_BYTE_CHARS.values())


def tokenizer_from_gguf(reader, *,
                        transformers_compat: bool = False) -> GGUFTokenizer:
  """Rebuilds the tokenizer a GGUF describes (`tokenizer.ggml.model` gpt2).

  Byte-level BPE: vocabulary `tokenizer.ggml.tokens` (id = index), merges
  `tokenizer.ggml.merges` ("left right", rank = index), no normalizer, the
  pre-tokenizer implied by `tokenizer.ggml.pre`, a ByteLevel decoder. Tokens
  of type CONTROL become special added tokens and USER_DEFINED ones plain
  added tokens (both matched whole in the text, so chat markup such as
  `<|im_start|>` stays one token; only CONTROL ones are dropped by
  `decode(skip_special_tokens=True)`), as llama.cpp and transformers do.

  For `tokenizer.ggml.pre` = 'smollm' (and the other StarCoder-style types)
  llama.cpp isolates every digit before GPT-2's split, exactly like the
  SmolLM2 tokenizer.json (Digits(individual_digits=True) then ByteLevel).
  transformers 5.x's GGUF tokenizer omits the digit split; the two differ
  only where a run of whitespace precedes a digit (e.g. "x  1": ours
  ['x', 'ĠĠ', '1'], transformers ['x', 'Ġ', 'Ġ', '1']); both decode
  identically. `transformers_compat=True` reproduces transformers.

  Stop ids: the EOS, `tokenizer.ggml.eot_token_id` / `eom_token_id` when
  present, and `<|im_end|>` when the EOS is another token but the chat
  template uses it (ChatML models whose EOS is `<|endoftext|>`).

  Args:
    reader: a `gguf.GGUFReader`.
    transformers_compat: mimic transformers' pre-tokenizer (tests only).

  Returns:
    A `GGUFTokenizer`.

  Raises:
    CheckpointError: a tokenizer model other than gpt2, an unknown
      pre-tokenizer type, or malformed metadata.
  """
  kind = get_field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise CheckpointError("GGUF has no tokenizer (tokenizer.ggml.model)")
  arch = get_field(reader, "general.architecture")
  if kind == "llama" and arch in SENTENCEPIECE_BPE_ARCHITECTURES:
    return gemma_tokenizer_from_gguf(reader)
  if kind != "gpt2":
    raise CheckpointError(
        f"unsupported GGUF tokenizer model {kind!r} (architecture {arch!r}); "
        f"seqdec builds byte-level BPE ('gpt2') tokenizers and Gemma 3's "
        f"SentencePiece-style one ('llama' in a 'gemma3' file)")
  tokens, types, special_ids = _read_vocab(reader)
  merges = get_field(reader, "tokenizer.ggml.merges")
  if merges is None:
    raise CheckpointError("GGUF gpt2 tokenizer lacks tokenizer.ggml.merges")
  return build_byte_level_tokenizer(
      tokens=tokens, merges=merges, token_types=types,
      pre=get_field(reader, "tokenizer.ggml.pre"), special_ids=special_ids,
      add_bos=bool(get_field(reader, "tokenizer.ggml.add_bos_token", False)),
      chat_template=get_field(reader, "tokenizer.chat_template"),
      transformers_compat=transformers_compat)


def _read_vocab(reader):
  """`(tokens, token types, special ids)` from `tokenizer.ggml.*`; types
  default to NORMAL; special ids (bos, eos, unknown, padding, eot, eom) are
  None when absent."""
  tokens = get_field(reader, "tokenizer.ggml.tokens")
  if not tokens:
    raise CheckpointError("GGUF tokenizer lacks tokenizer.ggml.tokens")
  types = get_field(reader, "tokenizer.ggml.token_type") or (
      [TOKEN_NORMAL] * len(tokens))
  if len(types) != len(tokens):
    raise CheckpointError(f"{len(types)} token types for {len(tokens)} "
                          f"tokens")
  special_ids = {
      name: get_field(reader, f"tokenizer.ggml.{name}_token_id")
      for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
  return tokens, types, special_ids


def _add_gguf_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str],
                     token_types: Sequence[int]) -> None:
  """CONTROL tokens become special added tokens, USER_DEFINED ones plain
  added tokens (both matched whole; only the first dropped by
  skip_special_tokens); then the vocabulary size is checked."""
  control = [AddedToken(t, special=True, normalized=False)
             for t, k in zip(tokens, token_types) if k == TOKEN_CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, k in zip(tokens, token_types) if k == TOKEN_USER_DEFINED]
  if control:
    backend.add_special_tokens(control)
  if user:
    backend.add_tokens(user)
  _check_size(backend, len(tokens))


def build_byte_level_tokenizer(
    *, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
    pre: Optional[str], special_ids: Mapping[str, Optional[int]],
    add_bos: bool, chat_template: Optional[str],
    transformers_compat: bool = False) -> GGUFTokenizer:
  """The tokenizer from already-read `tokenizer.ggml.*` values.

  See `tokenizer_from_gguf`. `special_ids` has keys bos, eos, unknown,
  padding, eot, eom (values None when absent).
  """
  vocab: dict[str, int] = {}
  for i, (tok, kind) in enumerate(zip(tokens, token_types)):
    # Added tokens keep their literal text; a normal token spelled outside
    # the byte alphabet (rare in converted files) is respelled so BPE can
    # reach it.
    if kind == TOKEN_NORMAL and not set(tok) <= _ALPHABET:
      tok = "".join(_BYTE_CHARS[b] for b in tok.encode("utf-8"))
    vocab.setdefault(tok, i)
  pairs = []
  for rank, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise CheckpointError(f"merge #{rank} {merge!r} is not 'left right'")
    pairs.append((parts[0], parts[1]))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
  backend.pre_tokenizer = _pre_tokenizer(pre, transformers_compat)
  backend.decoder = decoders.ByteLevel()
  _add_gguf_tokens(backend, tokens, token_types)

  return _wrap(backend, tokens, special_ids, add_bos, chat_template, pre)


# Turn-end markers that stop decoding when the chat template uses them but
# the file's EOS is another token (ChatML's <|im_end|>, Gemma's
# <end_of_turn>).
_TURN_ENDS = ("<|im_end|>", "<end_of_turn>")


def _wrap(backend: tokenizers.Tokenizer, tokens: Sequence[str],
          special_ids: Mapping[str, Optional[int]], add_bos: bool,
          chat_template: Optional[str], pre: Optional[str]) -> GGUFTokenizer:
  """The `GGUFTokenizer` around a built backend: BOS, stop ids, pad, unk."""
  n = len(tokens)

  def valid(i):
    return None if i is None or not 0 <= int(i) < n else int(i)

  bos, eos = valid(special_ids.get("bos")), valid(special_ids.get("eos"))
  stops = [i for i in (eos, valid(special_ids.get("eot")),
                       valid(special_ids.get("eom"))) if i is not None]
  for marker in _TURN_ENDS:
    i = backend.token_to_id(marker)
    if (i is not None and i not in stops and chat_template
        and marker in chat_template):
      stops.append(i)
  return GGUFTokenizer(
      backend, bos_id=bos, eos_ids=stops, add_bos=add_bos,
      chat_template=chat_template or None,
      bos_token=tokens[bos] if bos is not None else None,
      eos_token=tokens[eos] if eos is not None else None,
      pad_id=valid(special_ids.get("padding")),
      unk_id=valid(special_ids.get("unknown")), pre_tokenizer_type=pre)


def _check_size(backend: tokenizers.Tokenizer, n: int) -> None:
  if backend.get_vocab_size(with_added_tokens=True) > n:
    # An added token whose text is not in the vocabulary got a new id.
    raise CheckpointError(
        f"the GGUF vocabulary has {n} tokens but the rebuilt tokenizer has "
        f"{backend.get_vocab_size(with_added_tokens=True)}")


# ------------------------------------------------- SentencePiece-style BPE

# Architectures whose 'llama' (SentencePiece) vocabulary is rebuilt as
# Gemma's BPE with byte fallback.
SENTENCEPIECE_BPE_ARCHITECTURES = ("gemma3",)
SPACE = "\u2581"   # SentencePiece's visible space


def gemma_tokenizer_from_gguf(reader) -> GGUFTokenizer:
  """Gemma 3's tokenizer from a GGUF (`tokenizer.ggml.model` = 'llama').

  See `build_sentencepiece_bpe_tokenizer`; BOS is added when
  `tokenizer.ggml.add_bos_token` says so (true for Gemma: plain prompts
  start with <bos>).
  """
  tokens, types, special_ids = _read_vocab(reader)
  return build_sentencepiece_bpe_tokenizer(
      tokens=tokens, token_types=types, special_ids=special_ids,
      add_bos=bool(get_field(reader, "tokenizer.ggml.add_bos_token", True)),
      chat_template=get_field(reader, "tokenizer.chat_template"))


def merges_from_vocabulary_order(tokens: Sequence[str]
                                 ) -> list[tuple[str, str]]:
  """BPE merges implied by a vocabulary listed in merge order.

  Gemma's GGUF carries no merges and its scores do not follow the merge
  order; the token order does. Every token t (in vocabulary order) yields
  the merges (l, r) of its splits t = l + r with both halves in the
  vocabulary, longer left half first. The rank of a merge is its position
  in that list: earlier tokens' merges apply first. (transformers' GGUF
  converter derives the same list.)
  """
  index: dict[str, int] = {}
  for i, t in enumerate(tokens):
    index.setdefault(t, i)
  merges = []
  for t, i in index.items():
    for cut in range(len(t) - 1, 0, -1):
      left, right = t[:cut], t[cut:]
      if left in index and right in index:
        merges.append((left, right))
  return merges


def build_sentencepiece_bpe_tokenizer(
    *, tokens: Sequence[str], token_types: Sequence[int],
    special_ids: Mapping[str, Optional[int]], add_bos: bool,
    chat_template: Optional[str]) -> GGUFTokenizer:
  """Gemma's SentencePiece-style BPE with byte fallback, from GGUF values.

  * Spelling: SentencePiece writes a space as U+2581; llama.cpp's Gemma
    files spell tokens made only of spaces with real spaces, which are
    respelled with U+2581 so that the text normalised below reaches them.
  * Normaliser: every " " becomes U+2581 (no prefix space: Gemma adds
    none); no pre-tokenizer (the whole normalised text is one word).
  * Model: BPE over the vocabulary (id = index), merges from
    `merges_from_vocabulary_order`, byte fallback to the `<0xNN>` tokens
    for characters outside the vocabulary, unknown pieces fused.
  * Decoder: U+2581 -> " ", byte tokens -> bytes -> UTF-8, fused.
  * CONTROL tokens (<bos>, <eos>, <start_of_turn>, <unusedN>, ...) are
    special added tokens (matched whole, dropped by skip_special_tokens);
    USER_DEFINED ones (newline runs, [multimodal], ...) plain added tokens.
  """
  respelled = [SPACE * len(t) if t and set(t) == {" "} else t for t in tokens]
  vocab: dict[str, int] = {}
  for i, t in enumerate(respelled):
    vocab.setdefault(t, i)
  unk = special_ids.get("unknown")
  unk_token = respelled[unk] if unk is not None and 0 <= unk < len(
      tokens) else None
  backend = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges_from_vocabulary_order(respelled),
      unk_token=unk_token, fuse_unk=True, byte_fallback=True))
  backend.normalizer = normalizers.Replace(" ", SPACE)
  backend.decoder = decoders.Sequence([
      decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  _add_gguf_tokens(backend, respelled, token_types)
  return _wrap(backend, respelled, special_ids, add_bos, chat_template, None)
