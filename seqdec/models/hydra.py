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
target's head).

Hydra++ (the paper's tuned recipe), `prefix_attention=True`: one decoder
layer of the target's family (`eagle.eagle_config`, its own KV cache over
the committed context) reads the target's features, and the heads read
its output in f_t's place in u_k:

    g_t  = Block(f_<=t)_t                           causal, RoPE at t
    u_k  = [g_t ; e(x_{t+1}) ; ... ; e(x_{t+k})]    (h_k's residual stays f_t)

so a head sees the whole context, not only the last feature. The recipe's
other half, distillation from the target's distribution rather than the
data's tokens, is the loss every heads drafter here trains with
(`train.drafter.medusa_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.models.config import TransformerConfig, as_dtype
from seqdec.models.eagle import eagle_config
from seqdec.models.transformer import (EMBED, Block, KVCache, init_cache,
                                       inv_freq_array, logical_param,
                                       run_blocks)


@dataclasses.dataclass(frozen=True)
class HydraConfig:
  """num_heads K, hidden_size D, vocab_size V, prefix_attention (Hydra++),
  dtypes."""
  num_heads: int
  hidden_size: int
  vocab_size: int
  dtype: str = "float32"
  param_dtype: str = "float32"
  prefix_attention: bool = False


def hydra_config(target, num_heads: int, prefix_attention: bool = False
                 ) -> HydraConfig:
  c = target.config
  return HydraConfig(num_heads, c.hidden_size, c.vocab_size, c.dtype,
                     c.param_dtype, prefix_attention)


def prefix_config(target_config) -> TransformerConfig:
  """The Hydra++ prefix layer's one-block config (EAGLE's: the target's
  family and shapes, every layer global)."""
  return eagle_config(target_config)


class HydraHeads(nnx.Module):
  """Attributes: w_k `[(k+1) D, D]` and b_k `[D]` for k = 1 .. K (lists);
  with `prefix_attention`, `layers` (one `Block` of `block_config`, the
  prefix layer) and `inv_freq` (its RoPE frequencies), else None."""

  def __init__(self, config: HydraConfig, *, rngs: Optional[nnx.Rngs],
               block_config: Optional[TransformerConfig] = None):
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    d, zeros = config.hidden_size, nnx.initializers.zeros
    self.w = nnx.List([logical_param(rngs, ((k + 1) * d, d), (None, EMBED),
                                     pdt, zeros)
                       for k in range(1, config.num_heads + 1)])
    self.b = nnx.List([logical_param(rngs, (d,), (EMBED,), pdt, zeros)
                       for _ in range(config.num_heads)])
    prefix = config.prefix_attention
    if prefix and (block_config is None or block_config.hidden_size != d):
      raise ValueError("Hydra++ heads need the prefix layer's block_config "
                       "(prefix_config(target config))")
    self.block_config = block_config
    self.layers = (nnx.List([Block(block_config, 0, rngs=rngs)]) if prefix
                   else None)
    self.inv_freq = (nnx.Variable(inv_freq_array(block_config)) if prefix
                     else None)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """The prefix layer's cache (Hydra++)."""
    return init_cache(self.block_config, batch_size, max_len)

  def context(self, features: jax.Array, positions: jax.Array,
              cache: KVCache, mask: Optional[jax.Array] = None
              ) -> tuple[jax.Array, KVCache]:
    """Hydra++'s g: the prefix layer over `features [B, T, D]` at
    `positions [B, T]`, attending to `cache` (new K/V to its scratch slots,
    as the target's; `mask` None: causal) -> `(g [B, T, D], cache)`."""
    inv = self.inv_freq[...]
    return run_blocks(self.layers, self.block_config,
                      features.astype(self.dtype), positions, cache, mask,
                      None, inv, inv)

  def features(self, k: int, f: jax.Array, embeds: jax.Array,
               g: Optional[jax.Array] = None) -> jax.Array:
    """h_k: `f [..., D]`, `embeds [..., k, D]` (x_{t+1} .. x_{t+k}) ->
    `[..., D]`; `g [..., D]` Hydra++'s context feature (in f's place in
    u_k), None without prefix attention."""
    acc = jnp.promote_types(self.dtype, jnp.float32)
    u = jnp.concatenate([(f if g is None else g)[..., None, :], embeds], -2)
    u = u.reshape(u.shape[:-2] + (-1,)).astype(self.dtype)
    z = jnp.einsum("...i,io->...o", u, self.w[k - 1][...].astype(self.dtype),
                   preferred_element_type=acc)
    z = z + self.b[k - 1][...].astype(acc)
    return (f.astype(acc) + jax.nn.silu(z)).astype(self.dtype)


def create(target, num_heads: int, seed: int = 0,
           prefix_attention: bool = False) -> HydraHeads:
  return HydraHeads(hydra_config(target, num_heads, prefix_attention),
                    rngs=nnx.Rngs(seed),
                    block_config=(prefix_config(target.config)
                                  if prefix_attention else None))
