"""State-space (Mamba-2) and hybrid (Mamba-2 + attention) causal LMs in Flax
NNX, implementing the target protocol (`seqdec.models.protocol`), so the
autoregressive loop, the speculative loop, every drafter and `Generator`
serve them unchanged.

A model is a stack of pre-norm blocks; the config's `layer_types` says, per
layer, which mixer it runs: "mamba2" (`Mamba2Mixer`) or "attention" (the
transformer's `Attention`, with its KV cache and tree masks). An optional
gated MLP follows each mixer (Bamba; pure Mamba-2 has none):

    x += mixer(norm(x));   x += mlp(norm(x))        (if intermediate_size)

The cache (`HybridCache`) holds one entry per layer: `(k, v)` for attention
layers (`transformer.KVCache`'s layout, slot s = position s) and a
`MambaState` for Mamba-2 layers: the committed recurrent state (conv window
and SSM state, constant size) plus a *scratch window* of `scratch_slots`
entries that holds the per-token inputs of the tokens fed since the last
commit (pre-conv input, post-conv x/B/C, dt), never per-token states.

How the protocol maps onto a recurrent state:

* `__call__` over T new tokens with a mask `[B, T, W]` (W >= T; scratch
  window entries 0 .. W-1, the new tokens the last T): each new token's
  conv window and SSM output follow its root path in the window from the
  committed state (`ssd.conv_tree`, `ssd.ssd_masked`): one pass for a whole
  token tree (STree). No mask = causal over the T new tokens (the chunked
  SSD form; one token = the recurrent step).
* Level-by-level tree growth (layer-skip drafting through the target's
  cache): a call for level d writes its nodes' inputs into the window after
  levels < d; nodes of level d see their ancestors' inputs there and are
  recomputed from the root state along their paths. The states of earlier
  levels are neither kept nor needed.
* `commit(cache, n_keep, keep_index)` replays the kept path's inputs from the
  committed state (`ssd.ssd_replay`, `ssd.conv_state_after`): a few steps'
  work, the closed form of running them sequentially.
* A call of more than `scratch_slots` tokens (a long prompt; a whole
  sequence for training or an oracle) returns exact outputs but cannot be
  committed: its inputs do not fit the scratch, and a later commit makes the
  SSM state NaN. Prefill therefore runs long prompts in chunks of
  `max_call_tokens` (`seqdec.decoding.autoregressive.prefill`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.models import ssd
from seqdec.models import transformer as tr
from seqdec.models.config import TransformerConfig, as_dtype

MAMBA2, ATTENTION = "mamba2", "attention"
LAYER_TYPES = (MAMBA2, ATTENTION)
SSD_IMPLS = ("chunked", "sequential")
SSM_HEADS, SSM_INNER, CONV = "ssm_heads", "ssm_inner", "conv"


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  """Hyper-parameters of a Mamba-2 / hybrid LM.

  Attributes:
    vocab_size, hidden_size (D), num_layers (L).
    layer_types: one of LAYER_TYPES per layer.
    state_size: N, the SSM state per head and channel.
    num_ssm_heads: H; ssm_head_dim: P (H * P = expand * D).
    n_groups: G, B/C groups (H % G == 0).
    conv_kernel: K, causal conv taps.
    expand: d_inner = expand * D.
    chunk_size: SSD chunk length of the parallel form.
    ssd_impl: how a causal call of T > 1 tokens runs the SSM: 'chunked'
      (SSD's chunked algorithm, `ssd.ssd_chunked`, its state passing
      through `linear_scan` with back end `scan_impl`) or 'sequential'
      (`lax.scan` of the step). The same function; not a hyper-parameter.
    scan_impl: `linear_scan` back end of the chunked form's state passing.
    time_step_limit: (lo, hi) clamp of dt after the softplus.
    use_bias: in/out projections carry biases; use_conv_bias: the conv does.
    ssm_norm_eps: eps of the gated RMSNorm inside the mixer.
    intermediate_size: F of the gated MLP after each mixer; 0: no MLP.
    num_heads, num_kv_heads, head_dim, rope_theta, partial_rotary_factor,
      attention_bias, mlp_bias: the attention layers and MLPs (as in
      `TransformerConfig`).
    rms_norm_eps: eps of the block and final norms.
    tie_embeddings: the LM head is the embedding's transpose.
    max_position_embeddings: context length (attention layers; positions).
    scratch_slots: W_max, tokens a call may feed and commit (the widest tree
      window, prefill chunk); also the prefill chunk.
    dtype, param_dtype: compute and storage dtypes.
    architecture: the source architecture, for the record.
    attention_impl, platform: execution options (as `TransformerConfig`).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  layer_types: tuple[str, ...]
  state_size: int = 16
  num_ssm_heads: int = 4
  ssm_head_dim: int = 16
  n_groups: int = 1
  conv_kernel: int = 4
  expand: int = 2
  chunk_size: int = 64
  ssd_impl: str = "chunked"
  scan_impl: str = "auto"
  time_step_limit: tuple[float, float] = (0.0, math.inf)
  use_bias: bool = False
  use_conv_bias: bool = True
  ssm_norm_eps: float = 1e-5
  intermediate_size: int = 0
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  attention_bias: bool = False
  mlp_bias: bool = False
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_position_embeddings: int = 2048
  scratch_slots: int = 64
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_dtype: Optional[str] = None
  architecture: str = "Mamba2ForCausalLM"
  attention_impl: str = "auto"
  platform: Optional[str] = None
  # Not a field: a hybrid's matmuls are XLA's dots under every policy it
  # takes (`config.precision_of` reads it as a Transformer's field).
  matmul_impl: ClassVar[str] = "xla"

  def __post_init__(self):
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "time_step_limit",
                       tuple(float(x) for x in self.time_step_limit))
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_layers} layers")
    unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if unknown:
      raise ValueError(f"unknown layer types {unknown}; expected one of "
                       f"{LAYER_TYPES}")
    if self.num_ssm_heads * self.ssm_head_dim != self.d_inner:
      raise ValueError(
          f"num_ssm_heads * ssm_head_dim = {self.num_ssm_heads} * "
          f"{self.ssm_head_dim} must equal expand * hidden_size = "
          f"{self.d_inner}")
    if self.num_ssm_heads % self.n_groups or self.d_inner % self.n_groups:
      raise ValueError(f"n_groups ({self.n_groups}) must divide "
                       f"num_ssm_heads ({self.num_ssm_heads}) and d_inner")
    if self.conv_kernel < 2:
      raise ValueError(f"conv_kernel must be >= 2, got {self.conv_kernel}")
    if self.ssd_impl not in SSD_IMPLS:
      raise ValueError(f"unknown ssd_impl {self.ssd_impl!r}; expected one "
                       f"of {SSD_IMPLS}")
    if self.scratch_slots < 1 or self.chunk_size < 1:
      raise ValueError("scratch_slots and chunk_size must be positive")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    self.attention_config  # validates the attention / MLP fields

  @property
  def d_inner(self) -> int:
    return self.expand * self.hidden_size

  @property
  def conv_dim(self) -> int:
    """C: the conv's channels (x, B, C)."""
    return self.d_inner + 2 * self.n_groups * self.state_size

  @property
  def attention_config(self) -> TransformerConfig:
    """The `TransformerConfig` that the attention layers and MLPs read."""
    return TransformerConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=max(self.intermediate_size, 1),
        num_layers=self.num_layers, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
        max_position_embeddings=self.max_position_embeddings,
        tie_embeddings=self.tie_embeddings, qkv_bias=self.attention_bias,
        o_bias=self.attention_bias, mlp_bias=self.mlp_bias,
        partial_rotary_factor=self.partial_rotary_factor, dtype=self.dtype,
        param_dtype=self.param_dtype, matmul_dtype=self.matmul_dtype,
        architecture=self.architecture, attention_impl=self.attention_impl,
        platform=self.platform)

  def replace(self, **changes) -> "HybridConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (the tied head counted once)."""
    d, c, h = self.hidden_size, self.conv_dim, self.num_ssm_heads
    proj = self.d_inner + c + h
    mamba = (d * proj + proj * self.use_bias + self.conv_kernel * c
             + c * self.use_conv_bias + 3 * h + self.d_inner
             + self.d_inner * d + d * self.use_bias)
    a = self.attention_config
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    attn = d * (q + 2 * kv) + q * d + self.attention_bias * (q + 2 * kv + d)
    f = self.intermediate_size
    mlp = (3 * d * f + (2 * f + d) * self.mlp_bias + d) if f else 0
    layers = sum((mamba if kind == MAMBA2 else attn) + d + mlp
                 for kind in self.layer_types)
    v = self.vocab_size * d
    return v + layers + d + (0 if self.tie_embeddings else v)


class MambaState(NamedTuple):
  """One Mamba-2 layer's cache (module docstring).

  Attributes:
    conv: `[B, K-1, C]` the last K-1 committed pre-conv inputs (oldest first).
    ssm: `[B, H, P, N]` the committed SSM state.
    raw: `[B, W_max, C]` scratch: pre-conv inputs of the uncommitted tokens.
    xbc: `[B, W_max, C]` scratch: their post-conv (activated) x, B, C.
    dt: `[B, W_max, H]` scratch: their time steps.
    ok: `[B]` bool, the scratch holds the last call's tokens (False after a
      call of more than W_max tokens: committing it gives a NaN state).
  """
  conv: jax.Array
  ssm: jax.Array
  raw: jax.Array
  xbc: jax.Array
  dt: jax.Array
  ok: jax.Array


class HybridCache(NamedTuple):
  """Per-layer caches (`(k, v)` or `MambaState`) and `length` `[B]` int32,
  the committed tokens per row (target protocol)."""
  layers: tuple[Any, ...]
  length: jax.Array

  @property
  def max_len(self) -> int:
    for layer in self.layers:
      if not isinstance(layer, MambaState):
        return layer[0].shape[2]
    return 0

  def as_kv(self) -> tr.KVCache:
    """A `KVCache` view for the attention helpers (Mamba entries ride along
    untouched)."""
    return tr.KVCache(kv=self.layers, length=self.length)


def _param(rngs, shape, axes, dtype, init) -> nnx.Param:
  return tr.logical_param(rngs, shape, axes, dtype, init)


class Mamba2Mixer(nnx.Module):
  """The Mamba-2 mixer (Dao & Gu 2024), HF `Mamba2Mixer` / `BambaMixer`:

      z, u, dt' = x W_in                      gate, conv input, raw steps
      xBC       = silu(conv1d(u))             causal depthwise conv, K taps
      x, B, C   = split(xBC)                  [H, P], [G, N], [G, N]
      dt        = clamp(softplus(dt' + dt_bias), time_step_limit)
      y         = SSD(x, dt, A = -exp(A_log), B, C) + D x     (`ssd`)
      out       = (gated_rmsnorm(y, z)) W_out
      gated_rmsnorm(y, z) = w * groupnorm_G(y * silu(z))   (RMS per group)

  Attributes:
    in_proj `[D, d_inner + C + H]`, in_bias or None; conv_w `[K, C]`,
    conv_b `[C]` or None; dt_bias, A_log, D `[H]`; norm `[d_inner]`;
    out_proj `[d_inner, D]`, out_bias or None.
  """

  def __init__(self, config: HybridConfig, *, rngs: Optional[nnx.Rngs]):
    c = config
    self.config = c
    pdt = as_dtype(c.param_dtype)
    self.dtype = as_dtype(c.dtype)
    d, proj = c.hidden_size, c.d_inner + c.conv_dim + c.num_ssm_heads
    normal = nnx.initializers.normal(0.02)
    zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
    self.in_proj = _param(rngs, (d, proj), (tr.EMBED, None), pdt, normal)
    self.in_bias = (_param(rngs, (proj,), (None,), pdt, zeros)
                    if c.use_bias else None)
    self.conv_w = _param(rngs, (c.conv_kernel, c.conv_dim), (None, CONV), pdt,
                         nnx.initializers.normal(0.3))
    self.conv_b = (_param(rngs, (c.conv_dim,), (CONV,), pdt, zeros)
                   if c.use_conv_bias else None)
    h = c.num_ssm_heads

    def a_log_init(key, shape, dtype):
      return jnp.log(jnp.arange(1, shape[0] + 1, dtype=dtype))

    def dt_bias_init(key, shape, dtype):   # softplus^-1 of dt in [1e-3, 0.1]
      dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (
          math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
      return dt + jnp.log(-jnp.expm1(-dt))

    self.dt_bias = _param(rngs, (h,), (SSM_HEADS,), pdt, dt_bias_init)
    self.A_log = _param(rngs, (h,), (SSM_HEADS,), pdt, a_log_init)
    self.D = _param(rngs, (h,), (SSM_HEADS,), pdt, ones)
    self.norm = _param(rngs, (c.d_inner,), (SSM_INNER,), pdt, ones)
    self.out_proj = _param(rngs, (c.d_inner, d), (SSM_INNER, tr.EMBED), pdt,
                           normal)
    self.out_bias = (_param(rngs, (d,), (tr.EMBED,), pdt, zeros)
                     if c.use_bias else None)

  def init_state(self, batch_size: int) -> MambaState:
    c = self.config
    acc = ssd._acc(self.dtype)
    w = c.scratch_slots
    return MambaState(
        conv=jnp.zeros((batch_size, c.conv_kernel - 1, c.conv_dim), acc),
        ssm=jnp.zeros((batch_size, c.num_ssm_heads, c.ssm_head_dim,
                       c.state_size), acc),
        raw=jnp.zeros((batch_size, w, c.conv_dim), acc),
        xbc=jnp.zeros((batch_size, w, c.conv_dim), acc),
        dt=jnp.zeros((batch_size, w, c.num_ssm_heads), acc),
        ok=jnp.ones((batch_size,), jnp.bool_))

  def _split_xbc(self, xbc: jax.Array):
    """`[B, T, C]` -> x `[B, T, H, P]`, B and C `[B, T, G, N]`."""
    c = self.config
    b, t = xbc.shape[:2]
    gn = c.n_groups * c.state_size
    x = xbc[..., :c.d_inner].reshape(b, t, c.num_ssm_heads, c.ssm_head_dim)
    bm = xbc[..., c.d_inner:c.d_inner + gn].reshape(b, t, c.n_groups,
                                                    c.state_size)
    cm = xbc[..., c.d_inner + gn:].reshape(b, t, c.n_groups, c.state_size)
    return x, bm, cm

  def _project(self, x: jax.Array):
    """`[B, T, D]` -> (z `[B, T, d_inner]`, u `[B, T, C]`, dt `[B, T, H]`)."""
    c = self.config
    acc = ssd._acc(self.dtype)
    zud = jnp.dot(x.astype(self.dtype), self.in_proj[...].astype(self.dtype),
                  preferred_element_type=acc)
    if self.in_bias is not None:
      zud = zud + self.in_bias[...].astype(acc)
    z = zud[..., :c.d_inner]
    u = zud[..., c.d_inner:c.d_inner + c.conv_dim]
    dt = jax.nn.softplus(zud[..., c.d_inner + c.conv_dim:]
                         + self.dt_bias[...].astype(acc))
    lo, hi = c.time_step_limit
    return z, u, jnp.clip(dt, lo, hi)

  def _conv_params(self):
    acc = ssd._acc(self.dtype)
    return (self.conv_w[...].astype(acc),
            None if self.conv_b is None else self.conv_b[...].astype(acc))

  def __call__(self, x: jax.Array, state: MambaState,
               mask: Optional[jax.Array] = None
               ) -> tuple[jax.Array, MambaState]:
    """T new tokens against the committed state (module docstring).

    Args:
      x: `[B, T, D]` normed hidden states.
      state: this layer's `MambaState`.
      mask: None (causal among the T tokens) or `[B, T, W]` bool, the root
        paths in a scratch window of W >= T entries (the new tokens are
        its last T).

    Returns:
      `([B, T, D], state)` with the new tokens' inputs in scratch and the
      committed state unchanged.

    Raises:
      ValueError: a window wider than `scratch_slots`.
    """
    c = self.config
    b, t, _ = x.shape
    acc = ssd._acc(self.dtype)
    z, u, dt = self._project(x)
    A = -jnp.exp(self.A_log[...].astype(acc))
    w_conv, b_conv = self._conv_params()
    slots = c.scratch_slots
    if mask is None:
      xbc = jax.nn.silu(ssd.conv_causal(u, state.conv, w_conv, b_conv))
      xs, bm, cm = self._split_xbc(xbc)
      if t == 1:
        y, _ = ssd.ssd_step(state.ssm, xs[:, 0], dt[:, 0], A, bm[:, 0],
                            cm[:, 0])
        y = y[:, None]
      elif c.ssd_impl == "sequential":
        y, _ = ssd.ssd_sequential(xs, dt, A, bm, cm, state.ssm)
      else:
        y, _ = ssd.ssd_chunked(xs, dt, A, bm, cm, state.ssm,
                               chunk=min(c.chunk_size, t), impl=c.scan_impl)
      if t <= slots:
        state = state._replace(
            raw=state.raw.at[:, :t].set(u), xbc=state.xbc.at[:, :t].set(xbc),
            dt=state.dt.at[:, :t].set(dt), ok=jnp.ones((b,), jnp.bool_))
      else:
        state = state._replace(ok=jnp.zeros((b,), jnp.bool_))
    else:
      w = mask.shape[2]
      if w > slots:
        raise ValueError(
            f"a scratch window of {w} tokens exceeds the Mamba-2 state "
            f"buffer of {slots} slots (HybridConfig.scratch_slots): use a "
            f"smaller tree or a larger scratch_slots")
      raw = state.raw.at[:, w - t:w].set(u)
      xbc = jax.nn.silu(ssd.conv_tree(raw[:, :w], state.conv, w_conv, b_conv,
                                      mask))
      state = state._replace(raw=raw, xbc=state.xbc.at[:, w - t:w].set(xbc),
                             dt=state.dt.at[:, w - t:w].set(dt),
                             ok=jnp.ones((b,), jnp.bool_))
      xw, bw, _ = self._split_xbc(state.xbc[:, :w])
      _, _, cm = self._split_xbc(xbc)
      xs = xw[:, w - t:]
      y = ssd.ssd_masked(xw, state.dt[:, :w], A, bw, cm, state.ssm, mask)
    y = y + self.D[...].astype(acc)[:, None] * xs
    y = y.reshape(b, t, c.d_inner) * jax.nn.silu(z)
    g = y.reshape(b, t, c.n_groups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True)
                          + c.ssm_norm_eps)
    y = g.reshape(b, t, c.d_inner) * self.norm[...].astype(acc)
    out = jnp.dot(y.astype(self.dtype), self.out_proj[...].astype(self.dtype),
                  preferred_element_type=acc)
    if self.out_bias is not None:
      out = out + self.out_bias[...].astype(acc)
    return out.astype(self.dtype), state

  def commit(self, state: MambaState, n_keep: jax.Array,
             keep_index: Optional[jax.Array] = None) -> MambaState:
    """Keeps scratch entries `keep_index[b, :n_keep[b]]` (a prefix when
    None): replays them from the committed state (`ssd.ssd_replay`,
    `ssd.conv_state_after`); the scratch is left as is."""
    c = self.config
    b = n_keep.shape[0]

    def replay(idx):
      gather = lambda a: jnp.take_along_axis(a, idx[..., None], axis=1)
      xs, bm, _ = self._split_xbc(gather(state.xbc))
      acc = ssd._acc(self.dtype)
      A = -jnp.exp(self.A_log[...].astype(acc))
      ssm = ssd.ssd_replay(xs, gather(state.dt), A, bm, state.ssm, n_keep)
      conv = ssd.conv_state_after(gather(state.raw), state.conv, n_keep)
      return conv, ssm

    if keep_index is None:   # a prefix: one step's work when one is kept
      one = jnp.zeros((b, 1), jnp.int32)
      every = jnp.broadcast_to(jnp.arange(c.scratch_slots, dtype=jnp.int32),
                               (b, c.scratch_slots))
      conv, ssm = jax.lax.cond(jnp.max(n_keep) <= 1, lambda: replay(one),
                               lambda: replay(every))
    else:
      conv, ssm = replay(jnp.asarray(keep_index, jnp.int32))
    bad = (~state.ok & (n_keep > 0))[:, None, None, None]
    ssm = jnp.where(bad, jnp.nan, ssm)
    return state._replace(conv=conv, ssm=ssm)


class HybridBlock(nnx.Module):
  """x += mixer(norm(x)); x += mlp(norm(x)) (the MLP when F > 0).

  Attributes: input_norm; mixer (`Mamba2Mixer`) or attn (`Attention`);
    post_norm and mlp, or None.
  """

  def __init__(self, config: HybridConfig, layer: int, *,
               rngs: Optional[nnx.Rngs]):
    a = config.attention_config
    self.kind = config.layer_types[layer]
    self.input_norm = tr.rms_norm(a, rngs)
    if self.kind == MAMBA2:
      self.mixer, self.attn = Mamba2Mixer(config, rngs=rngs), None
    else:
      self.mixer, self.attn = None, tr.Attention(a, layer, rngs=rngs)
    if config.intermediate_size:
      self.post_norm, self.mlp = tr.rms_norm(a, rngs), tr.MLP(a, rngs=rngs)
    else:
      self.post_norm = self.mlp = None

  def __call__(self, x, positions, inv_freq, layer_cache, mask, write_start,
               visible):
    h = self.input_norm(x)
    if self.mixer is not None:
      h, layer_cache = self.mixer(h, layer_cache, mask)
    else:
      h, layer_cache = self.attn(h, positions, inv_freq, layer_cache,
                                 write_start, visible)
    x = x + h
    if self.mlp is not None:
      x = x + self.mlp(self.post_norm(x))
    return x, layer_cache


class HybridLM(nnx.Module):
  """A Mamba-2 or hybrid causal LM (module docstring); target protocol.

  `rngs=None` builds zeros, for loading checkpoints.

  Attributes:
    config: `HybridConfig`; embed `[V, D]`; layers; final_norm; lm_head
    `[D, V]` or None (tied); inv_freq: RoPE frequencies of the attention
    layers.
  """

  def __init__(self, config: HybridConfig, *, rngs: Optional[nnx.Rngs]):
    self.config = config
    a = config.attention_config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    self.embed = _param(rngs, (config.vocab_size, config.hidden_size),
                        (tr.VOCAB, tr.EMBED), pdt,
                        nnx.initializers.normal(0.02))
    self.layers = nnx.List([HybridBlock(config, i, rngs=rngs)
                            for i in range(config.num_layers)])
    self.final_norm = tr.rms_norm(a, rngs)
    self.lm_head = (None if config.tie_embeddings else _param(
        rngs, (config.hidden_size, config.vocab_size), (tr.EMBED, tr.VOCAB),
        pdt, nnx.initializers.normal(0.02)))
    self.inv_freq = nnx.Variable(tr.inv_freq_array(a))

  @property
  def max_call_tokens(self) -> int:
    """Tokens one call may feed and still commit (prefill chunks)."""
    return self.config.scratch_slots

  def check_window(self, num_tokens: int) -> None:
    """Raises ValueError if a scratch window of `num_tokens` (a tree's
    nodes, plus a drafter's lag) does not fit the state buffer."""
    if num_tokens > self.config.scratch_slots:
      raise ValueError(
          f"a tree window of {num_tokens} tokens exceeds the Mamba-2 state "
          f"buffer of {self.config.scratch_slots} slots "
          f"(HybridConfig.scratch_slots)")

  def init_cache(self, batch_size: int, max_len: int) -> HybridCache:
    """Attention layers get `max_len` KV slots; Mamba-2 layers a constant
    state plus `scratch_slots` of scratch."""
    a = self.config.attention_config
    dt = as_dtype(a.dtype)
    kv_shape = (batch_size, a.num_kv_heads, max_len, a.head_dim)
    layers = tuple(
        blk.mixer.init_state(batch_size) if blk.mixer is not None
        else (jnp.zeros(kv_shape, dt), jnp.zeros(kv_shape, dt))
        for blk in self.layers)
    return HybridCache(layers=layers,
                       length=jnp.zeros((batch_size,), jnp.int32))

  def commit(self, cache: HybridCache, n_keep: jax.Array,
             keep_index: Optional[jax.Array] = None) -> HybridCache:
    """Commits kept new tokens in every layer and advances `length`."""
    n_keep = jnp.asarray(n_keep, jnp.int32)
    kv = tr.commit(cache.as_kv(), n_keep, keep_index, layers=[
        i for i, blk in enumerate(self.layers) if blk.mixer is None])
    layers = tuple(
        blk.mixer.commit(cache.layers[i], n_keep, keep_index)
        if blk.mixer is not None else kv.kv[i]
        for i, blk in enumerate(self.layers))
    return HybridCache(layers=layers, length=kv.length)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

  def backbone(self, tokens: jax.Array, positions: jax.Array,
               cache: HybridCache, mask: Optional[jax.Array] = None,
               layers: Optional[Sequence[int]] = None,
               window_positions: Optional[jax.Array] = None):
    """The blocks `layers` (None: all) on new tokens (protocol; `mask` as
    `Transformer.backbone`). Returns `(hidden [B, T, D], cache)`."""
    b, t = positions.shape
    run = list(range(len(self.layers)) if layers is None else layers)
    attn_mask = tr.causal_mask(b, t) if mask is None else mask
    visible = write_start = None
    if any(self.layers[i].mixer is None for i in run):
      visible = tr.attention_visibility(cache.length, positions, attn_mask,
                                        cache.max_len, None, window_positions)
      write_start = cache.length + (attn_mask.shape[2] - t)
    x = self.embed_tokens(tokens)
    new = list(cache.layers)
    inv_freq = self.inv_freq[...]
    for i in run:
      x, new[i] = self.layers[i](x, positions, inv_freq, new[i], mask,
                                 write_start, visible)
    return x, HybridCache(layers=tuple(new), length=cache.length)

  def features(self, hidden: jax.Array) -> jax.Array:
    """The final norm's output: the LM head's input."""
    return self.final_norm(hidden)

  def head_weight(self, ids: jax.Array) -> jax.Array:
    """W_head[:, ids] `[D, M]`, built once by a trimmed drafter head
    (`head(..., weight=)`; `Transformer.head_weight`)."""
    if self.lm_head is None:
      return jnp.take(self.embed[...], ids, 0).T
    return jnp.take(self.lm_head[...], ids, 1)

  def head(self, features: jax.Array, ids: Optional[jax.Array] = None,
           weight: Optional[jax.Array] = None) -> jax.Array:
    """Features -> logits (of the vocabulary entries `ids` only, if given,
    or from their `weight = head_weight(ids)`)."""
    acc = ssd._acc(self.dtype)
    if weight is not None:
      return jnp.einsum("...d,dv->...v", features.astype(self.dtype),
                        weight.astype(self.dtype), preferred_element_type=acc)
    if self.lm_head is None:
      w = self.embed[...] if ids is None else jnp.take(self.embed[...], ids, 0)
      return jnp.einsum("...d,vd->...v", features.astype(self.dtype),
                        w.astype(self.dtype), preferred_element_type=acc)
    w = self.lm_head[...] if ids is None else jnp.take(self.lm_head[...],
                                                       ids, 1)
    return jnp.einsum("...d,dv->...v", features.astype(self.dtype),
                      w.astype(self.dtype), preferred_element_type=acc)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return self.head(self.features(hidden))

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               cache: HybridCache, mask: Optional[jax.Array] = None,
               logit_index: Optional[jax.Array] = None):
    """Forward over new tokens (protocol): `(logits [B, T or N, V], cache)`."""
    hidden, cache = self.backbone(tokens, positions, cache, mask)
    if logit_index is not None:
      hidden = jnp.take_along_axis(hidden, logit_index[..., None], axis=1)
    return self.logits(hidden), cache


def create(config: HybridConfig, seed: int = 0) -> HybridLM:
  """A randomly initialised `HybridLM` (one jitted init)."""
  abstract = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  state = jax.jit(lambda: nnx.state(HybridLM(config, rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)


# Tiny presets (runlocal arms, tests): byte-level vocabulary.
PRESETS = {
    "tiny-mamba2": HybridConfig(
        vocab_size=260, hidden_size=32, num_layers=2,
        layer_types=(MAMBA2, MAMBA2), state_size=8, num_ssm_heads=4,
        ssm_head_dim=16, n_groups=2, conv_kernel=4, expand=2, chunk_size=8,
        max_position_embeddings=1024, scratch_slots=32),
    "tiny-hybrid": HybridConfig(
        vocab_size=260, hidden_size=32, num_layers=3,
        layer_types=(MAMBA2, ATTENTION, MAMBA2), state_size=8,
        num_ssm_heads=4, ssm_head_dim=16, n_groups=2, conv_kernel=4,
        expand=2, chunk_size=8, intermediate_size=64, num_heads=4,
        num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5,
        tie_embeddings=False, max_position_embeddings=1024,
        scratch_slots=32, architecture="BambaForCausalLM"),
}
