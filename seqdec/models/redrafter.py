"""A recurrent draft head (Cheng et al., 2024, "Recurrent Drafter for Fast
Speculative Decoding in Large Language Models": ReDrafter).

One small RNN over the drafted tokens, conditioned on the target's feature
f = f_{L-1} (the LM head's input whose output chose the root x_L):

    s_1     = SiLU(W e(x_L) + b)                      the root starts it
    s_{k+1} = SiLU(W e(x_{L+k}) + U s_k + b)          W, U [D, D]
    r_k     = R_n( ... R_1([f ; s_k]))                R_i(u) = u + SiLU(A_i u + c_i)
    h_k     = P r_k                                   P [2D, D]
    q_k(x_{L+k} | f, x_L .. x_{L+k-1}) = softmax(head(h_k))

with e the target's (frozen) embedding and head its (frozen) LM head: one
head evaluation per drafted token, whatever the depth, and no limit on the
depth. The residual blocks start at zero and P at [I; 0], so at
initialisation h_k = f (the target's own next-token law at every step).

Deviation: ReDrafter maps [f ; s_k] to the vocabulary with its own LM head
(2D x V); here P projects to D and the target's head is shared, which saves
~56M parameters on SmolLM2 (as the shared-head Medusa option does), and
lets a trimmed head (VocabTrim) score M kept ids only.
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
class ReDrafterConfig:
  """hidden_size D, vocab_size V, num_layers n (residual blocks on the 2D
  input), train_depth K (the steps its loss trains: `num_heads` in the
  shared Medusa/Hydra loss), dtypes."""
  hidden_size: int
  vocab_size: int
  num_layers: int = 1
  train_depth: int = 4
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def num_heads(self) -> int:
    """The steps the loss trains (`train.drafter.medusa_loss`)."""
    return self.train_depth


def redrafter_config(target, num_layers: int = 1, train_depth: int = 4
                     ) -> ReDrafterConfig:
  c = target.config
  return ReDrafterConfig(c.hidden_size, c.vocab_size, num_layers,
                         train_depth, c.dtype, c.param_dtype)


class ReDrafterHead(nnx.Module):
  """Attributes: w, u `[D, D]`, b `[D]` (the RNN); a, c: lists of n
  `[2D, 2D]` and `[2D]` (the residual blocks); p `[2D, D]`."""

  def __init__(self, config: ReDrafterConfig, *, rngs: Optional[nnx.Rngs]):
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    d, zeros = config.hidden_size, nnx.initializers.zeros
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.w = logical_param(rngs, (d, d), (None, EMBED), pdt, init)
    self.u = logical_param(rngs, (d, d), (None, EMBED), pdt, init)
    self.b = logical_param(rngs, (d,), (EMBED,), pdt, zeros)
    self.a = nnx.List([logical_param(rngs, (2 * d, 2 * d), (None, EMBED),
                                     pdt, zeros)
                       for _ in range(config.num_layers)])
    self.c = nnx.List([logical_param(rngs, (2 * d,), (EMBED,), pdt, zeros)
                       for _ in range(config.num_layers)])

    def eye(key, shape, dtype):
      del key
      return jnp.eye(*shape, dtype=dtype)     # [I; 0]: h = f at init
    self.p = logical_param(rngs, (2 * d, d), (None, EMBED), pdt, eye)

  def _dot(self, x: jax.Array, w) -> jax.Array:
    acc = jnp.promote_types(self.dtype, jnp.float32)
    return jnp.einsum("...i,io->...o", x.astype(self.dtype),
                      w[...].astype(self.dtype), preferred_element_type=acc)

  def step(self, state: Optional[jax.Array], embed: jax.Array) -> jax.Array:
    """s' = SiLU(W e + U s + b): `state [..., D]` (None: the first step,
    s = 0), `embed [..., D]` -> `[..., D]`."""
    z = self._dot(embed, self.w) + self.b[...]
    if state is not None:
      z = z + self._dot(state, self.u)
    return jax.nn.silu(z).astype(self.dtype)

  def output(self, f: jax.Array, state: jax.Array) -> jax.Array:
    """h = P R_n(..R_1([f ; s])): `f, state [..., D]` -> `[..., D]`, the
    target head's input."""
    acc = jnp.promote_types(self.dtype, jnp.float32)
    r = jnp.concatenate([jnp.broadcast_to(f, state.shape).astype(acc),
                         state.astype(acc)], -1)
    for a, c in zip(self.a, self.c):
      r = r + jax.nn.silu(self._dot(r, a) + c[...].astype(acc))
    return self._dot(r, self.p).astype(self.dtype)

  def features(self, k: int, f: jax.Array, embeds: jax.Array) -> jax.Array:
    """h_k (module docstring): `f [..., D]`, `embeds [..., k, D]` (e(x_L) ..
    e(x_{L+k-1})) -> `[..., D]` (the Hydra heads' signature, so the
    teacher-forced loss is shared: `train.drafter.medusa_loss`)."""
    state = None
    for i in range(k):
      state = self.step(state, embeds[..., i, :])
    return self.output(f, state)


def create(target, num_layers: int = 1, train_depth: int = 4,
           seed: int = 0) -> ReDrafterHead:
  return ReDrafterHead(redrafter_config(target, num_layers, train_depth),
                       rngs=nnx.Rngs(seed))
