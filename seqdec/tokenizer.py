"""Tokenizer: a `tokenizers.Tokenizer` plus special ids and a chat template.

Loaders build it from an HF `tokenizer.json` directory or from GGUF metadata
(`seqdec.checkpoints.gguf`); torch and transformers are never needed.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from seqdec.errors import UserError

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}


class TokenizerError(UserError):
  """A tokenizer file is missing or unusable."""


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
  """Text <-> token ids, special ids and the chat template.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    bos_id: beginning-of-sequence id or None.
    eos_ids: ids that end generation (the model's EOS and, for chat models,
      the end-of-turn token).
    add_bos: whether `encode` prepends `bos_id`.
    chat_template: a jinja2 template in HF's convention, or None.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *,
               bos_id: Optional[int] = None, eos_ids: Sequence[int] = (),
               add_bos: bool = False, chat_template: Optional[str] = None,
               bos_token: Optional[str] = None,
               eos_token: Optional[str] = None):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
    self.add_bos = add_bos
    self.chat_template = chat_template
    self.bos_token = bos_token if bos_token is not None else (
        backend.id_to_token(bos_id) if bos_id is not None else "")
    self.eos_token = eos_token if eos_token is not None else (
        backend.id_to_token(self.eos_ids[0]) if self.eos_ids else "")
    self._template = None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
    """Token ids of `text`; special-token strings in it map to their ids."""
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      if not ids or ids[0] != self.bos_id:
        ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode(list(ids),
                               skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = True) -> str:
    """Renders a conversation with the model's chat template (jinja2).

    Uses the sandboxed environment, `trim_blocks` and `lstrip_blocks`, and the
    `raise_exception` helper, as HF chat templates expect.
    """
    if not self.chat_template:
      raise TokenizerError("this tokenizer has no chat template; pass plain "
                           "prompts instead of messages")
    for m in messages:
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise TokenizerError(f"a chat message needs 'role' and 'content', got "
                             f"{m!r}")
    if self._template is None:
      env = jinja2.sandbox.ImmutableSandboxedEnvironment(
          trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = _raise_exception
      self._template = env.from_string(self.chat_template)
    return self._template.render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token, eos_token=self.eos_token)

  def encode_chat(self, messages: Sequence[Message]) -> list[int]:
    """Ids of a rendered conversation; no extra BOS (templates include it)."""
    return self.encode(self.apply_chat_template(messages), add_bos=False)

  def stream_decoder(self, skip_special_tokens: bool = False
                     ) -> "StreamDecoder":
    return StreamDecoder(self, skip_special_tokens)

  # ---------------------------------------------------------------- loaders

  @classmethod
  def from_hf_dir(cls, path: str) -> "Tokenizer":
    """Loads `tokenizer.json` (+ `tokenizer_config.json`, generation config)."""
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      raise TokenizerError(f"no tokenizer.json in {path}")
    try:
      backend = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # the Rust error types are not exported
      raise TokenizerError(f"cannot read {tj}: {e}") from e
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    model_cfg = _read_json(os.path.join(path, "config.json"))

    def token_str(v):
      return v.get("content") if isinstance(v, dict) else v

    bos_tok, eos_tok = token_str(cfg.get("bos_token")), token_str(
        cfg.get("eos_token"))
    bos_id = backend.token_to_id(bos_tok) if bos_tok else None
    if bos_id is None:
      bos_id = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
    eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list)
                                      else [eos])
    if eos_tok and backend.token_to_id(eos_tok) is not None:
      eos_ids.insert(0, backend.token_to_id(eos_tok))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
      template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None and os.path.isfile(os.path.join(path,
                                                        "chat_template.jinja")):
      with open(os.path.join(path, "chat_template.jinja")) as f:
        template = f.read()
    return cls(backend, bos_id=bos_id, eos_ids=eos_ids,
               add_bos=bool(cfg.get("add_bos_token", False)),
               chat_template=template, bos_token=bos_tok, eos_token=eos_tok)

  def save_hf_dir(self, path: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json and
    generation_config.json into the directory `path`, so that
    `Tokenizer.from_hf_dir(path)` (and transformers' AutoTokenizer) load an
    equal tokenizer: the same ids, specials, BOS policy and chat template."""
    self.backend.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
           "add_bos_token": bool(self.add_bos),
           "bos_token": self.bos_token or None,
           "eos_token": self.eos_token or None}
    if self.chat_template:
      cfg["chat_template"] = self.chat_template
    gen = {"eos_token_id": list(self.eos_ids)}
    if self.bos_id is not None:
      gen["bos_token_id"] = self.bos_id
    for name, obj in (("tokenizer_config.json", cfg),
                      ("generation_config.json", gen)):
      with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)

  @classmethod
  def byte_level(cls) -> "Tokenizer":
    """A 260-token byte-level tokenizer with ChatML specials, for tiny models.

    Ids 0..255 are bytes; 256..259 are `<|bos|>`, `<|eos|>`, `<|im_start|>`,
    `<|im_end|>`. Every string round-trips.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF_CHAR[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                     use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([tokenizers.AddedToken(s, special=True,
                                                      normalized=False)
                                for s in specials])
    return cls(backend, bos_id=256, eos_ids=(257, 259), add_bos=True,
               chat_template=CHATML_TEMPLATE)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path} is not valid JSON: {e}") from e


class StreamDecoder:
  """Incremental detokenisation that never emits half a UTF-8 character.

  Byte-level BPE tokens can end inside a multi-byte character; decoding such a
  prefix yields U+FFFD. `push(id)` decodes the ids since the last emitted
  boundary and returns only the text that is complete, i.e.
      new_text = decode(ids[prefix:]) minus decode(ids[prefix:read])
  emitted only when it does not end in U+FFFD. `flush()` returns the rest.
  With `skip_special_tokens` the pieces join to `decode(ids,
  skip_special_tokens=True)`, the text a `GenerationResult` carries.
  """

  def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
    self._skip = skip_special_tokens
    self._tok = tokenizer
    self._ids: list[int] = []
    self._prefix = 0  # start of the window re-decoded for context
    self._read = 0    # ids already emitted as text

  def push(self, token_id: int) -> str:
    self._ids.append(int(token_id))
    prev = self._decode(self._ids[self._prefix:self._read])
    full = self._decode(self._ids[self._prefix:])
    if full.endswith("\ufffd") or len(full) <= len(prev):
      return ""
    self._prefix, self._read = self._read, len(self._ids)
    return full[len(prev):]

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=self._skip)

  def flush(self) -> str:
    prev = self._decode(self._ids[self._prefix:self._read])
    full = self._decode(self._ids[self._prefix:])
    self._prefix = self._read = len(self._ids)
    return full[len(prev):]
