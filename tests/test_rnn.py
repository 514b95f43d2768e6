"""RNN cells and the RNN LM: parallel (Newton) vs sequential, decode steps.

Whole-model bound (CONTRIBUTING): log-softmax of the logits, f32, 1e-4.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec.models import rnn

T, BATCH = 24, 2


def make_lm(cell, mode="parallel", **kw):
  cfg = rnn.RNNLMConfig(dim=16, num_layers=2, cell=cell, mode=mode,
                        impl="chunked", chunk=8, **kw)
  return rnn.RNNLM(cfg, rngs=nnx.Rngs(0))


def log_softmax_error(a, b):
  return float(jnp.max(jnp.abs(jax.nn.log_softmax(a) - jax.nn.log_softmax(b))))


@functools.partial(jax.jit, static_argnums=(0, 1))
def both_modes(gd_par, gd_seq, state, tokens):
  """Parallel and sequential full forwards, halves with carried state, and
  a decode-step loop, all from the same weights."""
  par, seq = nnx.merge(gd_par, state), nnx.merge(gd_seq, state)
  lp, s_par, infos = par(tokens)
  ls, s_seq, _ = seq(tokens)
  half = tokens.shape[1] // 2
  l1, s1, _ = par(tokens[:, :half])
  l2, s2, _ = par(tokens[:, half:], s1)

  def step(s, tok):
    logits, s = seq.decode_step(tok, s)
    return s, logits
  s_dec, ld = jax.lax.scan(step, seq.init_state(tokens.shape[0]), tokens.T)
  return dict(par=lp, seq=ls, halves=jnp.concatenate([l1, l2], 1),
              decode=jnp.swapaxes(ld, 0, 1), s_par=s_par, s_seq=s_seq,
              s_halves=s2, s_dec=s_dec,
              iters=jnp.stack([i.iterations for i in infos]),
              converged=jnp.stack([i.converged for i in infos]))


@pytest.mark.parametrize("cell", [
    "paralstm", pytest.param("paragru", marks=pytest.mark.slow),
    pytest.param("gru", marks=pytest.mark.slow)])
def test_lm_parallel_equals_sequential_and_decode(cell):
  model = make_lm(cell)
  gd_par, state = nnx.split(model)
  rnn.with_mode(model, "sequential")
  gd_seq, _ = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, T), 0, 256)
  out = both_modes(gd_par, gd_seq, state, tokens)
  assert out["par"].shape == (BATCH, T, 256)
  assert bool(jnp.all(out["converged"]))
  errors = {k: log_softmax_error(out[k], out["seq"])
            for k in ("par", "halves", "decode")}
  print(cell, "iterations per layer", np.asarray(out["iters"]), errors)
  assert max(errors.values()) <= 1e-4, errors
  for name in ("s_par", "s_halves", "s_dec"):
    for a, b in zip(out[name].cells, out["s_seq"].cells):
      assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) <= 1e-5
  # The logits depend on the input (not a constant model).
  assert float(jnp.std(out["seq"][:, -1])) > 1e-3


def test_state_layouts():
  gru, lstm = make_lm("paragru"), make_lm("paralstm")
  assert [s.shape for s in gru.init_state(3).cells] == [(3, 16)] * 2
  assert [s.shape for s in lstm.init_state(3).cells] == [(3, 2, 16)] * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(cell="lstm"), "unknown cell"),
    (dict(cell="paragru", mode="fast"), "unknown mode"),
    (dict(cell="paragru", impl="cuda"), "unknown impl"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rnn.RNNLMConfig(**kwargs)


def test_with_mode_rejects_unknown_mode():
  with pytest.raises(ValueError, match="unknown mode"):
    rnn.with_mode(make_lm("paragru"), "turbo")
