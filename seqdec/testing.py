"""Test helpers: tiny models with non-trivial weights and jitted calls.

Eager NNX calls dispatch op by op (slow on CPU); tests go through `jitted`,
which splits the model once and jits a pure function of its state.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from seqdec.models import config as config_lib
from seqdec.models import transformer as tr


def tiny_model(dtype: str = "float32", seed: int = 0, scale: float = 0.3,
               **overrides) -> tr.Transformer:
  """The 'tiny' preset with weights ~ N(0, scale^2) (norm scales ~ N(1, 1)).

  The default 0.02 init gives near-uniform logits, where every comparison is
  trivially close; these weights give peaked, well-separated logits.
  """
  cfg = config_lib.PRESETS["tiny"].replace(dtype=dtype, param_dtype=dtype,
                                           **overrides)
  # Every Param is redrawn on the host (from its shape and dtype only), so the
  # model's own random init is never compiled: the jitted init returns only
  # the rest (RoPE inv_freq), the RNG calls dead code. Drawing with numpy
  # rather than jax.random keeps XLA out of it altogether (a jitted redraw
  # compiled one threefry per leaf: 3-7 s per configuration on 2 cores).
  abstract = nnx.eval_shape(lambda: tr.Transformer(cfg, rngs=nnx.Rngs(seed)))
  graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(tr.Transformer(cfg, rngs=nnx.Rngs(seed)),
                                   nnx.Param, ...)[2])()
  rng = np.random.default_rng([seed, 0])   # perturbed() draws from [s, 1]

  def draw(x):
    """Matrices ~ N(0, scale^2), vectors (norm scales) ~ N(1, 1)."""
    z = rng.standard_normal(x.shape)
    return jnp.asarray(z * scale if x.ndim > 1 else z + 1.0, x.dtype)
  return nnx.merge(graphdef, jax.tree.map(draw, params), rest)


def tiny_gemma3(dtype: str = "float32", seed: int = 0) -> tr.Transformer:
  """The 'tiny-gemma3' preset (six layers, five local with a sliding
  window of 8 and one global, two RoPE bases, sandwich norms, QK-norm,
  GeGLU, tied embeddings; vocabulary 260) with `tiny_model` weights."""
  c = config_lib.PRESETS["tiny-gemma3"]
  return tiny_model(dtype, seed, **{
      k: getattr(c, k) for k in (
          "vocab_size", "hidden_size", "intermediate_size", "num_layers",
          "num_heads", "num_kv_heads", "head_dim", "sliding_window",
          "layer_types", "rope_theta", "rope_local_theta", "activation",
          "embed_scale", "norm_offset", "sandwich_norm", "qk_norm",
          "query_pre_attn_scalar", "rms_norm_eps", "architecture",
          "tie_embeddings", "max_position_embeddings")})


def tiny_hybrid(preset: str = "tiny-hybrid", dtype: str = "float32",
                seed: int = 0, scale: float = 0.3, **overrides):
  """A `seqdec.models.hybrid` preset ('tiny-mamba2', 'tiny-hybrid') with
  weights that make every part matter: matrices ~ N(0, scale^2), the conv
  ~ N(0, 0.5^2), norm scales ~ N(1, 1), biases ~ N(0, 0.1^2), D ~ N(1,
  0.5^2), A = -exp(A_log) in [-4, -0.5] and dt in [0.05, 0.5] (decays of
  0.14 .. 0.98 per token: the state forgets within a few tokens, and
  remembers)."""
  from seqdec.models import hybrid  # pylint: disable=g-import-not-at-top
  cfg = hybrid.PRESETS[preset].replace(dtype=dtype, param_dtype=dtype,
                                       **overrides)
  abstract = nnx.eval_shape(lambda: hybrid.HybridLM(cfg, rngs=None))
  graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
  rest = jax.jit(lambda: nnx.split(hybrid.HybridLM(cfg, rngs=None),
                                   nnx.Param, ...)[2])()
  rng = np.random.default_rng([seed, 2])

  def draw(path, x):
    name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
    shape = x.shape
    if name == "A_log":
      z = np.log(rng.uniform(0.5, 4.0, shape))
    elif name == "dt_bias":
      dt = rng.uniform(0.05, 0.5, shape)
      z = dt + np.log(-np.expm1(-dt))       # softplus^-1
    elif name == "D":
      z = 1.0 + 0.5 * rng.standard_normal(shape)
    elif name == "conv_w":
      z = 0.5 * rng.standard_normal(shape)
    elif "bias" in name or name == "conv_b":
      z = 0.1 * rng.standard_normal(shape)
    elif x.ndim > 1:
      z = scale * rng.standard_normal(shape)
    else:
      z = 1.0 + rng.standard_normal(shape)
    return jnp.asarray(z, x.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, params),
                   rest)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, positions, cache, mask, logit_index):
  return nnx.merge(graphdef, state)(tokens, positions, cache, mask,
                                    logit_index)


def jitted(model: tr.Transformer):
  """`fn(tokens, positions, cache, mask=None, logit_index=None)`, jitted."""
  graphdef, state = nnx.split(model)

  def fn(tokens, positions, cache, mask=None, logit_index=None):
    return _apply(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                  cache, mask, logit_index)
  return fn


commit = jax.jit(tr.commit)


def full_forward(model, tokens):
  """Logits `[B, T, V]` of one uncached forward over `tokens` `[B, T]`."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return jitted(model)(tokens, pos, model.init_cache(b, t))[0]


def perturbed(model: tr.Transformer, noise: float, seed: int = 1
              ) -> tr.Transformer:
  """A copy of `model` with every weight matrix w -> w + noise * std(w) * N(0,1).

  A draft model that agrees with the target often but not always: on
  `tiny_model()`, greedy top-1 agreement is ~73% at noise 0.02, ~52% at 0.05
  and ~30% at 0.1 (24-token random contexts).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng([seed, 1])   # independent of tiny_model's

  def perturb(x):
    if x.ndim < 2:
      return x
    w = np.asarray(x, np.float64)
    return jnp.asarray(w + noise * w.std() * rng.standard_normal(w.shape),
                       x.dtype)
  return nnx.merge(graphdef, jax.tree.map(perturb, params), rest)


def cyclic_model(period: int = 5, dtype: str = "float32", seed: int = 0,
                 residual_scale: float = 0.003) -> tr.Transformer:
  """A tiny model whose greedy output mostly follows t -> cycle successor.

  Tokens are grouped in cycles of `period` (t -> t+1 within a group, the last
  wrapping to the first); the untied head is the embedding with rows permuted
  by that map (scaled up), and the attention/MLP outputs are damped by
  `residual_scale`, so logits ~ <e_t, e_{succ^-1(v)}> peak at v = succ(t),
  with context-dependent perturbations. Its continuations repeat, so
  prompt-lookup drafting accepts long runs: a target for testing acceptance.
  """
  model = tiny_model(dtype, seed=seed, tie_embeddings=False)
  v = model.config.vocab_size
  succ = np.arange(v)
  for start in range(0, v - v % period, period):
    succ[start:start + period] = np.roll(np.arange(start, start + period), -1)
  inverse = np.argsort(succ)
  embed = model.embed[...]
  model.lm_head[...] = 4.0 * embed[inverse].T / jnp.linalg.norm(
      embed[inverse], axis=-1)[None, :]
  model.final_norm.scale[...] = jnp.ones_like(model.final_norm.scale[...])
  for block in model.layers:
    block.attn.o_proj[...] = block.attn.o_proj[...] * residual_scale
    block.mlp.down_proj[...] = block.mlp.down_proj[...] * residual_scale
  return model


def ancestor_mask_oracle(parents) -> np.ndarray:
  """Ancestor-or-self masks by walking parent pointers on the host: the tests'
  oracle for `seqdec.kernels.tree_mask` (independent of its pointer
  doubling and of the Pallas kernel).

      mask[..., i, j] = 1  iff  j is reached from i by following parents

  Args:
    parents: `[N]` or `[B, N]` integers, -1 for roots, valid (forests too).

  Returns:
    bool `[N, N]` or `[B, N, N]`, matching the input's rank.
  """
  arr = np.asarray(parents, np.int64)
  rows = arr.reshape(-1, arr.shape[-1])
  n = rows.shape[1]
  out = np.zeros((rows.shape[0], n, n), bool)
  for b, row in enumerate(rows):
    for i in range(n):
      j = i
      while j >= 0:
        out[b, i, j] = True
        j = row[j]
  return out.reshape(arr.shape + (n,))


# XLA:CPU debug options for compiling with most optimisations off (tiny
# models, compile-bound): the legacy elemental emitters instead of the MLIR
# fusion emitters compile about twice as fast and run slower (CONTRIBUTING.md,
# "Optimisation level"). `run_on_devices(optimize=False)` passes them as
# XLA_FLAGS; tests/conftest.py adds them per compilation.
FAST_COMPILE_XLA_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def run_on_devices(script: str, *args: str, devices: int = 8,
                   x64: bool = False, optimize: bool = True,
                   xla_flags: str = "", timeout: float = 900) -> str:
  """Runs Python `script` (with `args`) in a subprocess on `devices`
  simulated CPU devices (the count is fixed when jax starts) and returns
  its last stdout line that starts with 'RESULT ', without the marker.
  `optimize=False` compiles with XLA's backend optimisations off
  (JAX_DISABLE_MOST_OPTIMIZATIONS: SPMD partitioning still runs, so the
  collectives are the same), for tiny models whose cost is compiling;
  `optimize=True` with them on, whatever the caller's environment. Off
  also compiles with XLA:CPU's legacy elemental emitters instead of its
  MLIR fusion emitters (about half the compile time of a tiny model's
  decoding programs; slower code on a real model). `xla_flags` are more
  XLA flags; such a run does not use the caller's persistent compilation
  cache (JAX_COMPILATION_CACHE_DIR), whose programs were measured to be
  served in place of ones compiled under the flags.
  A failed run raises AssertionError with the end of its stderr."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  flags = f"--xla_force_host_platform_device_count={devices}"
  if not optimize:
    flags += "".join(f" --{k}={str(v).lower()}"
                     for k, v in FAST_COMPILE_XLA_OPTIONS.items())
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_ENABLE_X64="1" if x64 else "0", XLA_FLAGS=flags)
  if xla_flags:
    env["XLA_FLAGS"] = f"{flags} {xla_flags}"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0" if optimize else "1"
  done = subprocess.run([sys.executable, "-c", script, *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  results = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
  assert results, done.stdout[-2000:]
  return results[-1][len("RESULT "):]
