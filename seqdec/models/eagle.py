"""EAGLE's feature-level draft network (Li et al., 2024, "EAGLE: Speculative
Sampling Requires Rethinking Feature Uncertainty").

The drafter is autoregressive over the target's *features* f_t (the LM head's
input at position t, `Transformer.features`) rather than over tokens. The
pair at position t fuses the feature before it with the token at t (which
resolves the feature's sampling uncertainty):

    u_t  = W_fc [e(x_t) ; f_{t-1}] + b_fc          W_fc: [2D, D]
    h_t  = Block(u_<=t)_t                           one decoder layer, its
                                                    own KV cache, RoPE at t
    f^_t = h_t   ~  f_t,   q(x_{t+1}) = softmax(head(f^_t))

with e the target's (frozen) embedding and head the target's (frozen) LM
head, so the network owns only W_fc, b_fc and the block: ~4.6M parameters
for SmolLM2-135M (D = 576, F = 1536), ~2 % of the target. When drafting,
deeper tree levels feed the network's own prediction f^ in place of the
unknown f (`seqdec.decoding.drafters.eagle`); training regresses f^_t on
f_t and matches q to the target's distribution (`seqdec.train.eagle`).

The block is a decoder layer of the target's family (same norms, MLP,
attention shapes; no sliding window), built from `eagle_config`.

EAGLE-3's fused input (Li et al., 2025, "EAGLE-3: Scaling up Inference
Acceleration of Large Language Models via Training-Time Test"): with `taps`
(target blocks, e.g. `eagle3_taps`: a low and a middle one) the target's
feature at t is F_t = [n(h^a_t) ; n(h^b_t) ; f_t], n the target's final
norm applied to the input of each tapped block
(`seqdec.models.protocol.backbone_features`), and the network first fuses it

    g_t = W_fuse F_t                                W_fuse: [(k+1)D, D]

which takes f's place in u_t. Deeper tree levels feed the network's own
output f^ there instead (the fused feature of an unknown position is not
known), which EAGLE-3's training-time test teaches it to read
(`seqdec.train.drafter.forward_steps`). f^ still predicts the final
feature f (regression and distillation targets are unchanged).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.models.config import TransformerConfig, as_dtype
from seqdec.kernels import packed_matmul
from seqdec.models.transformer import (EMBED, Block, KVCache, init_cache,
                                       inv_freq_array, logical_param,
                                       pack_block_weights, pack_param,
                                       run_blocks, weight_matmul)


def eagle_config(target) -> TransformerConfig:
  """The one-block config of an EAGLE drafter for `target`: the target's
  layer shapes and family, every layer global (no sliding window). A
  Mamba-2 / hybrid target (`hybrid.HybridConfig`) lends its attention
  layers' config: the drafter is a decoder block of the same width. Its
  own weights are plain arrays (`matmul_impl` 'xla' whatever the target's
  policy packs; `packed` packs a copy for decoding)."""
  target = getattr(target, "attention_config", target)
  return target.replace(num_layers=1, layer_types=None, sliding_window=None,
                        matmul_impl="xla")


def eagle3_taps(num_layers: int) -> tuple[int, int]:
  """EAGLE-3's low and middle taps of an L-block target: the inputs of
  blocks 2 and L // 2 (its high feature here is the final one, f)."""
  if num_layers < 4:
    raise ValueError(f"EAGLE-3 taps need a target of >= 4 blocks, got "
                     f"{num_layers}")
  return 2, num_layers // 2


def parse_taps(spec: str, num_layers: int) -> tuple[int, ...]:
  """A taps option: '' (none: EAGLE-1's final features only), 'eagle3'
  (`eagle3_taps`) or comma-separated block indices '2,15' (`check_taps`);
  ValueError otherwise."""
  spec = spec.strip()
  if not spec:
    return ()
  if spec == "eagle3":
    return eagle3_taps(num_layers)
  try:
    taps = [int(t) for t in spec.split(",")]
  except ValueError:
    raise ValueError(f"taps must be 'eagle3' or block indices like '2,15', "
                     f"got {spec!r}") from None
  return check_taps(taps, num_layers)


def check_taps(taps: Sequence[int], num_layers: int) -> tuple[int, ...]:
  """`taps` as a tuple of distinct block indices in [1, L) (block 0's input
  is the embedding), ascending; ValueError otherwise."""
  taps = tuple(int(t) for t in taps)
  if list(taps) != sorted(set(taps)) or any(
      not 1 <= t < num_layers for t in taps):
    raise ValueError(f"feature taps must be distinct ascending block "
                     f"indices in [1, {num_layers}), got {list(taps)}")
  return taps


class EagleNet(nnx.Module):
  """The fused-input decoder layer of the module docstring.

  Attributes:
    config: `eagle_config(target config)`.
    fc: `[2D, D]` ('embed', 'embed'), rows [embedding ; feature]; fc_bias
      `[D]`.
    layers: one `Block` (a list, for `run_blocks`).
    inv_freq: `[Dh/2]` RoPE frequencies.
    taps: the target blocks whose inputs it reads (EAGLE-3), or ().
    fuse: `[(k+1)D, D]` W_fuse with k = len(taps) > 0, else None.
  """

  def __init__(self, config: TransformerConfig, *,
               rngs: Optional[nnx.Rngs], taps: Sequence[int] = ()):
    if config.num_layers != 1:
      raise ValueError(f"an EAGLE network has one block, got num_layers="
                       f"{config.num_layers} (use eagle_config)")
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    # The matmuls' operand dtype (the target's policy: bf16 under
    # bf16_weights, so W_fc and W_fuse meet a bf16 kernel, not an f32 dot
    # with the weights converted at every call).
    self.mm_dtype = as_dtype(config.matmul_dtype or config.dtype)
    d = config.hidden_size
    self.taps = tuple(int(t) for t in taps)
    self.fuse = logical_param(
        rngs, ((len(self.taps) + 1) * d, d), (None, EMBED), pdt,
        nnx.initializers.normal(0.02)) if self.taps else None
    self.fc = logical_param(rngs, (2 * d, d), (None, EMBED), pdt,
                     nnx.initializers.normal(0.02))
    self.fc_bias = logical_param(rngs, (d,), (EMBED,), pdt, nnx.initializers.zeros)
    self.layers = nnx.List([Block(config, 0, rngs=rngs)])
    self.inv_freq = nnx.Variable(inv_freq_array(config))

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    return init_cache(self.config, batch_size, max_len)

  def lift(self, features: jax.Array) -> jax.Array:
    """The feature slot's input: a target's fused `[..., (k+1)D]` F mapped
    to g = W_fuse F (module docstring); `[..., D]` features (the network's
    own predictions, or a target's with no taps) pass unchanged."""
    d = self.config.hidden_size
    if features.shape[-1] == d:
      return features
    if self.fuse is None or features.shape[-1] != self.fuse[...].shape[0]:
      raise ValueError(f"EAGLE network with taps {list(self.taps)} got "
                       f"features of width {features.shape[-1]}; expected "
                       f"{d} or {(len(self.taps) + 1) * d}")
    return weight_matmul("...k,kd->...d", features, self.fuse[...],
                         self.dtype, self.mm_dtype)

  def __call__(self, embeds: jax.Array, features: jax.Array,
               positions: jax.Array, cache: KVCache,
               mask: Optional[jax.Array] = None
               ) -> tuple[jax.Array, KVCache]:
    """Pairs `(e(x_t), f_{t-1})` at `positions` -> predicted features.

    Args:
      embeds: `[B, T, D]` the target's embeddings of x_t.
      features: `[B, T, D]` the feature before each (target's or predicted),
        or a target's fused `[B, T, (k+1)D]` (`lift`).
      positions: `[B, T]` int32, t.
      cache: this network's `KVCache` (new K/V go to scratch, as the
        target's).
      mask: as `Transformer.backbone` (None: causal).

    Returns:
      `(f^ [B, T, D], cache)`.
    """
    x = jnp.concatenate([embeds.astype(self.dtype),
                         self.lift(features).astype(self.dtype)], axis=-1)
    u = weight_matmul("btk,kd->btd", x, self.fc[...], self.dtype,
                      self.mm_dtype)
    u = u + self.fc_bias[...].astype(self.dtype)
    inv = self.inv_freq[...]
    return run_blocks(self.layers, self.config, u, positions, cache, mask,
                      None, inv, inv)


def packed(net: EagleNet) -> EagleNet:
  """A copy of `net` (sharing nothing it changes) whose weight matmuls
  (W_fc, W_fuse and its block's) are `PackedWeight`s, multiplied by the
  packed CPU kernel as a packed target's are: the same function (the
  matmul's operands and accumulation follow the panels' dtype), for a
  drafter serving an f32_packed / bf16_packed target."""
  packed_matmul.ensure_registered()
  twin = nnx.clone(net)      # new variables (the arrays stay shared)
  pack_param(twin.fc)
  if twin.fuse is not None:
    pack_param(twin.fuse)
  for block in twin.layers:
    pack_block_weights(block)
  return twin


def create(target: TransformerConfig, seed: int = 0,
           taps: Sequence[int] = ()) -> EagleNet:
  """A randomly initialised `EagleNet` for `target` (jitted init), reading
  the inputs of target blocks `taps` too (EAGLE-3; `check_taps`)."""
  config = eagle_config(target)
  taps = check_taps(taps, getattr(target, "num_layers", 0)) if taps else ()
  abstract = nnx.eval_shape(lambda: EagleNet(config, rngs=nnx.Rngs(0),
                                             taps=taps))
  state = jax.jit(lambda: nnx.state(EagleNet(config, rngs=nnx.Rngs(seed),
                                             taps=taps)))()
  return nnx.merge(nnx.graphdef(abstract), state)
