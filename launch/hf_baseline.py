"""HF transformers as the benchmarks' baseline (torch CPU, float32).

Imported only by `launch/bench_*.py` (as `hf_baseline`: a script's own
directory is on `sys.path`); torch and transformers are test and benchmark
oracles, never needed to decode, so this lives outside the `seqdec` package
(tests/test_imports.py checks that nothing under seqdec imports them).
"""

from __future__ import annotations

import os
import time


class HFSide:
  """HF transformers greedy decoding of given ids (torch CPU, float32)."""

  def __init__(self, gguf_path: str, num_threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(num_threads)
    self.torch = torch
    d, f = os.path.split(os.path.abspath(gguf_path))
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(
        d, gguf_file=f)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32)
    self.model.eval()

  def encode(self, prompt) -> list[int]:
    """Ids of a plain-text prompt (the tokenizer's own special tokens, e.g.
    Gemma's <bos>) or of a conversation (`encode_chat`)."""
    if isinstance(prompt, str):
      return [int(i) for i in self.tokenizer(prompt)["input_ids"]]
    return self.encode_chat(prompt)

  def encode_chat(self, messages) -> list[int]:
    ids = self.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding
      ids = ids["input_ids"]
    return [int(i) for i in ids]

  def _inputs(self, ids):
    t = self.torch.tensor([ids], dtype=self.torch.long)
    return t, self.torch.ones_like(t)

  def prefill_s(self, ids) -> float:
    """Seconds of one cache-filling forward over the prompt."""
    x, mask = self._inputs(ids)
    with self.torch.inference_mode():
      t0 = time.perf_counter()
      self.model(input_ids=x, attention_mask=mask, use_cache=True,
                 logits_to_keep=1)
      return time.perf_counter() - t0

  def generate(self, ids, n: int, **options) -> tuple[list[int], float]:
    """(exactly n tokens, greedy unless `options` sample; wall seconds of
    `generate`).

    `options` go to `generate`, e.g. `prompt_lookup_num_tokens=10` for HF's
    prompt-lookup decoding, `do_sample=True, temperature=1.0, top_k=0`.
    """
    x, mask = self._inputs(ids)
    options = dict(dict(do_sample=False), **options)
    with self.torch.inference_mode():
      t0 = time.perf_counter()
      out = self.model.generate(x, attention_mask=mask, max_new_tokens=n,
                                min_new_tokens=n, eos_token_id=[], **options)
      seconds = time.perf_counter() - t0
    toks = out[0, len(ids):].tolist()
    if len(toks) != n:
      raise RuntimeError(f"HF generated {len(toks)} tokens, expected {n}")
    return toks, seconds

  def top2_margin(self, ids) -> tuple[list[int], float]:
    """HF's top-2 next-token ids after `ids` and their log-prob margin."""
    x, mask = self._inputs(ids)
    with self.torch.inference_mode():
      logits = self.model(input_ids=x, attention_mask=mask,
                          logits_to_keep=1).logits[0, -1]
      logp = self.torch.log_softmax(logits.double(), -1)
      top = self.torch.topk(logp, 2)
    return top.indices.tolist(), float(top.values[0] - top.values[1])
