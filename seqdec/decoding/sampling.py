"""Sampling rules: small static classes with per-row parameters.

A `Sampler` is a hashable tuple of `LogitsTransform`s (static: it changes the
program); the numbers they read are per-row arrays in `SamplingParams`
(dynamic: changing them never recompiles). The transforms act in HF's order
(temperature, top-k, top-p); rows whose temperature is 0 take the argmax of
the raw logits.

Random keys are per row: row r's key for its i-th new token is
`fold_in(fold_in(key(seed), row_id[r]), i)`, so a sampled row does not depend
on its position in the batch or on the other rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.ops import argmax_last
from seqdec.parallel import sharding


@flax.struct.dataclass
class SamplingParams:
  """Per-row sampling parameters.

  Attributes:
    temperature: `[B]` float32; 0 means greedy for that row.
    top_k: `[B]` int32; 0 disables top-k for that row.
    top_p: `[B]` float32 in (0, 1]; 1 disables nucleus filtering.
  """
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def make(cls, batch_size: int, temperature=0.0, top_k=0, top_p=1.0):
    """Broadcasts scalars or per-row sequences to `[B]` arrays (validated)."""
    def row(v, dtype, name):
      a = np.broadcast_to(np.asarray(v, dtype), (batch_size,)).copy()
      if name == "temperature" and (a < 0).any():
        raise ValueError(f"temperature must be >= 0, got {v}")
      if name == "top_k" and (a < 0).any():
        raise ValueError(f"top_k must be >= 0, got {v}")
      if name == "top_p" and ((a <= 0) | (a > 1)).any():
        raise ValueError(f"top_p must be in (0, 1], got {v}")
      return jnp.asarray(a)
    return cls(temperature=row(temperature, np.float32, "temperature"),
               top_k=row(top_k, np.int32, "top_k"),
               top_p=row(top_p, np.float32, "top_p"))

  def pad(self, batch_size: int) -> "SamplingParams":
    """Pads rows (greedy) up to `batch_size`."""
    n = batch_size - self.temperature.shape[0]
    if n <= 0:
      return self
    return SamplingParams(
        temperature=jnp.pad(self.temperature, (0, n)),
        top_k=jnp.pad(self.top_k, (0, n)),
        top_p=jnp.pad(self.top_p, (0, n), constant_values=1.0))


class LogitsTransform:
  """A logits transform `[B, V] -> [B, V]` driven by per-row parameters."""

  def __call__(self, logits: jax.Array, params: SamplingParams) -> jax.Array:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Temperature(LogitsTransform):
  """logits / temperature (rows with temperature 0 are handled as greedy)."""

  def __call__(self, logits, params):
    t = jnp.maximum(params.temperature, 1e-6)[:, None]
    return logits / t.astype(logits.dtype)


@dataclasses.dataclass(frozen=True)
class TopK(LogitsTransform):
  """Keeps each row's top_k[b] largest logits (top_k <= max_k, a static cap).

  threshold_b = k-th largest logit of row b; logits below it become -inf.
  `lax.top_k` needs a static k, so the row's k-th value is read from the
  top `max_k` values.
  """
  max_k: int = 64

  def __call__(self, logits, params):
    k = jnp.clip(params.top_k, 1, self.max_k)
    top = sharding.top_k(logits, self.max_k)[0]                  # [B, max_k]
    thresh = jnp.take_along_axis(top, (k - 1)[:, None], axis=1)  # [B, 1]
    keep = (logits >= thresh) | (params.top_k[:, None] <= 0)
    return jnp.where(keep, logits, -jnp.inf)


# Candidates `TopP` reads before falling back to a full sort: a nucleus of
# up to this many tokens costs one `lax.top_k` (measured on 2 CPU cores,
# [16, 262144] float32 rows: top_k(1024) 19 ms, a full sort 1.34 s).
TOP_P_CANDIDATES = 1024


@dataclasses.dataclass(frozen=True)
class TopP(LogitsTransform):
  """Nucleus: keeps the smallest set of top tokens whose mass reaches top_p.

  With probabilities sorted descending p_(1) >= p_(2) >= ... (p_(i) =
  exp(z_(i) - m) / S, with the max m and the sum S over the unsorted row)
  and the exclusive prefix mass c_i = sum_{j<i} p_(j), token (i) is kept
  iff c_i < top_p (at least one token always is).

  c_i is nondecreasing, so when fewer than K = min(max_k, V) of the top K
  candidates (`lax.top_k`) satisfy it, the nucleus lies inside them and the
  rest of the row need not be sorted. Otherwise (some row's nucleus is
  larger than K) the whole batch takes the full sort, whose prefix sums are
  computed as the first K (the same call on the same values) followed by
  the tail's, so both branches give bitwise the same kept set.
  """
  max_k: int = TOP_P_CANDIDATES

  def __call__(self, logits, params):
    v = logits.shape[-1]
    k = min(self.max_k, v)
    m = jnp.max(logits, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)
    top_p = params.top_p[:, None]

    def mass_before(sorted_desc):       # [B, N] -> exclusive prefix mass
      probs = jnp.exp(sorted_desc - m) / total
      head = jnp.cumsum(probs[:, :k], axis=-1)
      mass = head
      if sorted_desc.shape[-1] > k:
        mass = jnp.concatenate(
            [head, head[:, -1:] + jnp.cumsum(probs[:, k:], axis=-1)], axis=-1)
      return jnp.concatenate([jnp.zeros_like(mass[:, :1]), mass[:, :-1]],
                             axis=-1)

    def threshold(sorted_desc):         # [B, N] -> [B, 1] smallest kept value
      n_keep = jnp.sum(mass_before(sorted_desc) < top_p, axis=-1)
      return jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=1)

    top = sharding.top_k(logits, k)[0]                          # [B, K]
    inside = jnp.all(jnp.sum(mass_before(top) < top_p, axis=-1) < k)
    thresh = jax.lax.cond(
        inside | (k == v), lambda: threshold(top),
        lambda: threshold(jnp.sort(logits, axis=-1)[:, ::-1]))
    return jnp.where(logits >= thresh, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A static chain of rules. `Sampler(())` is pure greedy.

  `__call__(logits [B, V], keys [B] (typed PRNG keys), params)` returns
  `(tokens [B] int32, logprobs [B] float32)`, where logprobs are the chosen
  tokens' log-probabilities under the model (the raw softmax, temperature 1).
  """
  rules: tuple[LogitsTransform, ...] = ()

  @property
  def greedy(self) -> bool:
    return not self.rules

  def __call__(self, logits: jax.Array, keys: jax.Array,
               params: SamplingParams):
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    best = argmax_last(logits)
    if self.greedy:
      tokens = best
    else:
      x = logits
      for rule in self.rules:
        x = rule(x, params)
      sampled = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
      tokens = jnp.where(params.temperature > 0, sampled, best)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=1)[:, 0]


def make_sampler(temperature=0.0, top_k=0, top_p=1.0,
                 max_top_k: int = 64) -> Sampler:
  """The smallest static rule chain that can serve these (per-row) values."""
  t = np.asarray(temperature, np.float32)
  if not (t > 0).any():
    return Sampler(())
  rules: list[LogitsTransform] = [Temperature()]
  k = np.asarray(top_k)
  if (k > 0).any():
    if (k > max_top_k).any():
      raise ValueError(f"top_k={int(k.max())} exceeds max_top_k={max_top_k}; "
                       f"raise max_top_k")
    rules.append(TopK(max_k=max_top_k))
  if (np.asarray(top_p) < 1).any():
    rules.append(TopP())
  return Sampler(tuple(rules))


def row_keys(seed: int, row_ids: Sequence[int] | np.ndarray) -> jax.Array:
  """`[B]` typed keys: fold_in(key(seed), row_id)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(
      jnp.asarray(row_ids, jnp.uint32))


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
  """Each row's key for its `step`-th new token: fold_in(row_key, step)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def processed_probs(logits: jax.Array, params: SamplingParams,
                    max_top_k: int = 64) -> jax.Array:
  """The distribution each row samples from, `[B, V] -> [B, V]` float32.

      p_b = softmax(topp_b(topk_b(logits_b / T_b)))     T_b > 0
      p_b = onehot(argmax_v logits_b[v])                T_b = 0

  with the rules of `make_sampler` in the same order (`Temperature`, `TopK`,
  `TopP`). Each filter acts only on the rows that enable it (top_k > 0,
  top_p < 1), so a row's p is what a sampler built for that row alone
  draws from, whatever the other rows ask for. top_k is capped at
  min(max_top_k, V). The filters run only if some row enables them
  (`lax.cond`), and TopP sorts a whole row only when a nucleus is larger
  than its `TOP_P_CANDIDATES` candidates.
  Speculative sampling rules use this as the target.
  """
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  best = argmax_last(x)
  z = Temperature()(x, params)

  def only_where(enabled, rule, z):
    return jax.lax.cond(jnp.any(enabled),
                        lambda z: jnp.where(enabled[:, None], rule(z, params),
                                            z),
                        lambda z: z, z)

  z = only_where(params.top_k > 0,
                 TopK(max_k=min(max_top_k, x.shape[-1])), z)
  z = only_where(params.top_p < 1, TopP(), z)
  p = jax.nn.softmax(z, axis=-1)
  greedy = jax.nn.one_hot(best, x.shape[-1], dtype=p.dtype)
  return jnp.where(params.temperature[:, None] > 0, p, greedy)
