"""Medusa heads (Cai et al., 2024, "Medusa: Simple LLM Inference
Acceleration Framework with Multiple Decoding Heads").

K extra heads read the target's feature f_t (the LM head's input at
position t, `Transformer.features`); head k (k = 1 .. K) predicts the token
k positions beyond the target's own next-token prediction:

    h_k(f)   = f + SiLU(W_k f + b_k)                 residual block, W_k [D, D]
    q_k(x_{t+k+1} | f_t) = softmax(head_k(h_k(f_t)))

W_k starts at zero (h_k is the identity at initialisation, as in Medusa).
`head_k` is Medusa's own LM head per head, initialised from the target's
(`own_heads=True`, V x D more parameters per head: 28M for SmolLM2), or the
target's frozen head shared by every head (`own_heads=False`, the default
here: a deviation from Medusa that keeps the drafter ~1.3M parameters per
head; `launch/bench_spec.py` measures both).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.kernels.packed_matmul import PackedWeight
from seqdec.models.config import as_dtype
from seqdec.models.transformer import EMBED, VOCAB, logical_param


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
  """num_heads K, hidden_size D, vocab_size V, own_heads, dtypes."""
  num_heads: int
  hidden_size: int
  vocab_size: int
  own_heads: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"


def medusa_config(target, num_heads: int, own_heads: bool = False
                  ) -> MedusaConfig:
  c = target.config
  return MedusaConfig(num_heads, c.hidden_size, c.vocab_size, own_heads,
                      c.dtype, c.param_dtype)


class MedusaHeads(nnx.Module):
  """Attributes:
    w: `[K, D, D]` residual blocks' weights; b: `[K, D]` biases.
    heads: `[K, D, V]` own LM heads (`own_heads`), else None.
  """

  def __init__(self, config: MedusaConfig, *, rngs: Optional[nnx.Rngs],
               init_head: Optional[jax.Array] = None):
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    k, d, v = config.num_heads, config.hidden_size, config.vocab_size
    zeros = nnx.initializers.zeros
    self.w = logical_param(rngs, (k, d, d), (None, EMBED, None), pdt, zeros)
    self.b = logical_param(rngs, (k, d), (None, EMBED), pdt, zeros)
    if config.own_heads:
      self.heads = logical_param(rngs, (k, d, v), (None, EMBED, VOCAB), pdt,
                                 zeros)
      if init_head is not None:        # each head starts as the target's
        self.heads.set_value(jnp.broadcast_to(
            jnp.asarray(init_head, pdt), (k, d, v)))
    else:
      self.heads = None

  def features(self, f: jax.Array) -> jax.Array:
    """`[..., D]` -> `[..., K, D]`: h_k(f) for every head."""
    acc = jnp.promote_types(self.dtype, jnp.float32)
    z = jnp.einsum("...d,kde->...ke", f.astype(self.dtype),
                   self.w[...].astype(self.dtype), preferred_element_type=acc)
    z = z + self.b[...].astype(acc)
    return (f[..., None, :].astype(acc) + jax.nn.silu(z)).astype(self.dtype)

  def logits(self, f: jax.Array, target, ids=None, weight=None
             ) -> jax.Array:
    """`[..., D]` -> `[..., K, V]` (or `[..., K, M]` over `ids`) logits of
    every head; `target` supplies the shared head (`weight`: its prebuilt
    trimmed weight, `target.head_weight(ids)`, or None)."""
    h = self.features(f)
    if self.heads is None:
      return target.head(h, ids, weight)
    w = self.heads[...] if ids is None else jnp.take(self.heads[...], ids, 2)
    acc = jnp.promote_types(self.dtype, jnp.float32)
    return jnp.einsum("...kd,kdv->...kv", h, w.astype(self.dtype),
                      preferred_element_type=acc)


def create(target, num_heads: int, own_heads: bool = False,
           seed: int = 0) -> MedusaHeads:
  """Fresh heads for `target` (own heads start as the target's LM head)."""
  config = medusa_config(target, num_heads, own_heads)
  init_head = None
  if own_heads:
    w = target.embed[...] if target.lm_head is None else target.lm_head[...]
    if isinstance(w, PackedWeight):   # an f32_packed target
      w = w.to_array()
    init_head = w.T if target.lm_head is None else w
  return MedusaHeads(config, rngs=nnx.Rngs(seed), init_head=init_head)
