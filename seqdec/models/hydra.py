"""Hydra heads (Ankner et al., 2024, "Hydra: Sequentially-Dependent Draft
Heads for Medusa Decoding").

Medusa's heads see only the feature f_t; Hydra's head k also sees the
tokens drafted before it, so candidates along a tree path are predicted
jointly:

    u_k  = [f_t ; e(x_{t+1}) ; ... ; e(x_{t+k})]       (k + 1) D inputs
    h_k  = f_t + SiLU(W_k u_k + b_k)                    W_k [(k+1) D, D]
    q_k(x_{t+k+1} | f_t, x_{t+1..t+k}) = softmax(head(h_k))

with e the target's (frozen) embedding and head its (frozen) LM head. When
drafting, x_{t+1} is the root (the target's own choice at f_t) and
x_{t+2..t+k} the node's ancestors. W_k starts at zero (h_k = f_t, the
target's head). The Hydra++ recipe (a prefix-attention layer over the
context, teacher distillation) is not implemented here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.models.config import as_dtype
from seqdec.models.transformer import EMBED, logical_param


@dataclasses.dataclass(frozen=True)
class HydraConfig:
  """num_heads K, hidden_size D, vocab_size V, dtypes."""
  num_heads: int
  hidden_size: int
  vocab_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"


def hydra_config(target, num_heads: int) -> HydraConfig:
  c = target.config
  return HydraConfig(num_heads, c.hidden_size, c.vocab_size, c.dtype,
                     c.param_dtype)


class HydraHeads(nnx.Module):
  """Attributes: w_k `[(k+1) D, D]` and b_k `[D]` for k = 1 .. K (lists)."""

  def __init__(self, config: HydraConfig, *, rngs: Optional[nnx.Rngs]):
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    d, zeros = config.hidden_size, nnx.initializers.zeros
    self.w = nnx.List([logical_param(rngs, ((k + 1) * d, d), (None, EMBED),
                                     pdt, zeros)
                       for k in range(1, config.num_heads + 1)])
    self.b = nnx.List([logical_param(rngs, (d,), (EMBED,), pdt, zeros)
                       for _ in range(config.num_heads)])

  def features(self, k: int, f: jax.Array, embeds: jax.Array) -> jax.Array:
    """h_k: `f [..., D]`, `embeds [..., k, D]` (x_{t+1} .. x_{t+k}) ->
    `[..., D]`."""
    acc = jnp.promote_types(self.dtype, jnp.float32)
    u = jnp.concatenate([f[..., None, :], embeds], -2)
    u = u.reshape(u.shape[:-2] + (-1,)).astype(self.dtype)
    z = jnp.einsum("...i,io->...o", u, self.w[k - 1][...].astype(self.dtype),
                   preferred_element_type=acc)
    z = z + self.b[k - 1][...].astype(acc)
    return (f.astype(acc) + jax.nn.silu(z)).astype(self.dtype)


def create(target, num_heads: int, seed: int = 0) -> HydraHeads:
  return HydraHeads(hydra_config(target, num_heads), rngs=nnx.Rngs(seed))
