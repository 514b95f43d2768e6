"""S4D, LRU and GateLoop (`seqdec.models.linear_rnn`): parallel == step ==
an independent NumPy oracle.

Bounds (CONTRIBUTING, absolute max|a - b|): float64 1e-10; float32 1e-5 (a
single module). The oracles are written from the papers' formulas in NumPy
complex128 and read only the raw parameters: S4D as a causal convolution with
its kernel 2 Re(C Abar^k Bbar), LRU as a plain loop, GateLoop in its
materialised attention-like form.
"""

import functools
import os
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec.models import linear_rnn

# The persistent compilation cache off for every test here: jaxlib 0.10.2
# crashed (SIGSEGV) in the cache on programs of these modules, writing
# test_linear_rnn.py's (a ci-like slow tier) and reading test_hybrid.py's
# speculative ones back (conftest.py `no_compile_cache`).
pytestmark = pytest.mark.usefixtures("no_compile_cache")

BATCH, T, D = 2, 24, 8
PROMPT = 10  # prompt length of the prefill-then-decode split
# Test cases: name -> (layer name, constructor kwargs).
CASES = {
    "s4d": ("s4d", dict(state_size=8)),
    "lru": ("lru", dict(state_size=6)),
    "gateloop": ("gateloop", dict(num_heads=2)),
    "gateloop_phase": ("gateloop", dict(num_heads=2, phase=True)),
}
# Every scan back end x two chunk sizes (5 pads T = 24, 8 divides it; the
# chunk only changes 'chunked').
VARIANTS = tuple(itertools.product(("sequential", "associative", "chunked"),
                                   (5, 8)))


def make(case, dtype="float64", impl="auto", chunk=64):
  name, kwargs = CASES[case]
  return linear_rnn.layer_class(name)(D, rngs=nnx.Rngs(0), dtype=dtype,
                                      impl=impl, chunk=chunk, **kwargs)


def inputs(model, dtype=np.float64, seed=1):
  """x [B, T, D] and a random (nonzero) h0 of the model's state layout."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, T, D))
  h0 = rng.normal(size=(BATCH,) + model.state_shape)
  if jnp.issubdtype(model.state_dtype, jnp.complexfloating):
    h0 = h0 + 1j * rng.normal(size=h0.shape)
  return x.astype(dtype), (0.5 * h0).astype(model.state_dtype)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def step_loop(model, x, h):
  """The recurrent form over x [B, T, D] from h: (y [B, T, D], h_T)."""
  def body(h, xt):
    y, h = model.step(xt, h)
    return h, y
  h, ys = jax.lax.scan(body, h, jnp.swapaxes(x, 0, 1))
  return jnp.swapaxes(ys, 0, 1), h


@functools.partial(jax.jit, static_argnums=(0,))
def parallel_and_steps(graphdefs, state, x, h0):
  """Parallel outputs of every graphdef (one back end each, same weights) and
  the step loop of the first."""
  models = [nnx.merge(g, state) for g in graphdefs]
  return [m(x, h0) for m in models], step_loop(models[0], x, h0)


def check_parallel_vs_steps(case, dtype, variants, bound):
  models = [make(case, dtype, impl, chunk) for impl, chunk in variants]
  state = nnx.state(models[0])
  x, h0 = inputs(models[0], np.dtype(dtype))
  outs, (y_ref, h_ref) = parallel_and_steps(
      tuple(nnx.graphdef(m) for m in models), state, x, h0)
  errors = {v: (max_err(y, y_ref), max_err(h, h_ref))
            for v, (y, h) in zip(variants, outs)}
  print(case, dtype, "max|y - y_step|, max|h_T - h_step|:", errors)
  assert outs[0][0].dtype == np.dtype(dtype), outs[0][0].dtype
  assert outs[0][1].dtype == models[0].state_dtype
  assert all(max(e) <= bound for e in errors.values()), errors
  # Not a trivial layer: the output depends on the recurrence's state.
  assert float(np.std(np.asarray(y_ref))) > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_parallel_equals_steps_float64(case, x64):
  del x64
  check_parallel_vs_steps(case, "float64", VARIANTS, 1e-10)


F32_VARIANTS = (("associative", 64), ("chunked", 5))


def test_parallel_equals_steps_float32():
  check_parallel_vs_steps("gateloop", "float32", F32_VARIANTS, 1e-5)


@pytest.mark.slow
def test_parallel_equals_steps_float32_complex_layers():
  """The float32 check for the complex-state layers, in a fresh process:
  two ci-like slow tiers crashed (SIGSEGV inside XLA:CPU's compile, jaxlib
  0.10.2) compiling the complex64 LRU program in an xdist worker that had
  run many tests before; the case passes in a fresh process."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  code = ("import sys; sys.path.insert(0, %r)\n"
          "import test_linear_rnn as t\n"
          "for case in ('s4d', 'lru', 'gateloop_phase'):\n"
          "  t.check_parallel_vs_steps(case, 'float32', t.F32_VARIANTS, 1e-5)\n"
          "print('ok')\n") % here
  env = dict(os.environ, SEQDEC_TEST_COMPILE_CACHE="off")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=env, timeout=600)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
      proc.stdout[-2000:], proc.stderr[-4000:])


@jax.jit
def _prefill_then_decode(graphdef, state, x, h0):
  model = nnx.merge(graphdef, state)
  y_full, h_full = model(x, h0)
  y_prompt, h_k = model(x[:, :PROMPT], h0)
  y_rest, h_end = step_loop(model, x[:, PROMPT:], h_k)
  return y_full, h_full, jnp.concatenate([y_prompt, y_rest], 1), h_end


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_decode(case, x64):
  """Parallel over the first k tokens (giving h_k), then step by step, equals
  one parallel pass over everything."""
  del x64
  model = make(case, impl="chunked", chunk=4)
  x, h0 = inputs(model)
  graphdef, state = nnx.split(model)
  y_full, h_full, y_split, h_split = _prefill_then_decode(graphdef, state, x,
                                                          h0)
  errors = (max_err(y_split, y_full), max_err(h_split, h_full))
  print(case, "split vs full (y, h_T):", errors)
  assert max(errors) <= 1e-10, errors


@pytest.mark.parametrize("case", CASES)
def test_batch_rows_independent(case, x64):
  del x64
  model = make(case, impl="associative")
  x, h0 = inputs(model)
  x2 = x.copy()
  x2[1] = np.random.default_rng(7).normal(size=x2[1].shape)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, h0)[0])
  y, y2 = np.asarray(run(state, x)), np.asarray(run(state, x2))
  assert max_err(y2[0], y[0]) <= 1e-10
  assert max_err(y2[1], y[1]) > 1e-3  # row 1 did see its new input


# --- oracles (NumPy complex128, from the raw parameters) ----------------------


def _np(p):
  return np.asarray(p[...], np.float64)


def _cplx(p):
  p = _np(p)
  return p[0] + 1j * p[1]


def s4d_oracle(m, x, h0, euler=False):
  """y = K * x (causal convolution over time, per channel) + D_skip x + the
  free response of h0, with K_k = 2 Re(sum_c C Abar^k Bbar) and ZOH (or, as
  a negative control, Euler: Bbar = Delta B)."""
  a = -np.exp(_np(m.log_a_real)) + 1j * _np(m.a_imag)          # [D, C]
  dt = np.exp(_np(m.log_dt))[:, None]
  abar = np.exp(dt * a)
  bbar = dt * _cplx(m.b) if euler else (abar - 1) / a * _cplx(m.b)
  c = _cplx(m.c)
  powers = abar[None] ** np.arange(T + 1)[:, None, None]        # [T+1, D, C]
  kernel = 2 * np.real(np.sum(c * powers[:T] * bbar, -1))       # [T, D]
  y = np.zeros_like(x)
  for t in range(T):
    y[:, t] = np.einsum("kd,bkd->bd", kernel[:t + 1], x[:, t::-1])
    y[:, t] += 2 * np.real(np.sum(c * powers[t + 1] * h0, -1))
  return y + _np(m.skip) * x


def lru_oracle(m, x, h0):
  """h_t = lambda h_{t-1} + gamma (B x_t), y_t = Re(C h_t) + D_skip x_t."""
  lam = np.exp(-np.exp(_np(m.nu_log)) + 1j * np.exp(_np(m.theta_log)))
  gamma = np.exp(_np(m.gamma_log))
  b, c, skip = _cplx(m.b), _cplx(m.c), _np(m.skip)
  h, ys = h0, []
  for t in range(T):
    h = lam * h + gamma * (x[:, t] @ b.T)
    ys.append(np.real(h @ c.T) + skip * x[:, t])
  return np.stack(ys, 1)


def gateloop_oracle(m, x, h0):
  """y_t = sum_{s<=t} sum_i q_ti (prod_{s<r<=t} a_ri) k_si v_s
  + sum_i q_ti (prod_{r<=t} a_ri) h0_i, per head, q scaled by 1/sqrt(Dh)."""
  nh, dh = m.num_heads, m.head_size

  def heads(z):
    return z.reshape(z.shape[:-1] + (nh, dh))
  q = heads(x @ _np(m.q.kernel)) / np.sqrt(dh)
  k, v = heads(x @ _np(m.k.kernel)), heads(x @ _np(m.v.kernel))
  a = 1 / (1 + np.exp(-heads(x @ _np(m.gate.kernel) + _np(m.gate.bias))))
  if m.phase:
    a = a * np.exp(1j * heads(x @ _np(m.theta.kernel)))
  y = np.zeros((BATCH, T, nh, dh), complex)
  for t in range(T):
    y[:, t] = np.einsum("bhi,bhi,bhij->bhj", q[:, t],
                        np.prod(a[:, :t + 1], 1), h0)
    for s in range(t + 1):
      decay = np.prod(a[:, s + 1:t + 1], 1)                     # [B, H, Dh]
      y[:, t] += np.einsum("bhi,bhi,bhi,bhj->bhj", q[:, t], decay, k[:, s],
                           v[:, s])
  return np.real(y).reshape(BATCH, T, D)


ORACLES = {"s4d": s4d_oracle, "lru": lru_oracle, "gateloop": gateloop_oracle}


@pytest.mark.parametrize("case", CASES)
def test_matches_oracle(case, x64):
  del x64
  model = make(case)
  x, h0 = inputs(model)
  graphdef, state = nnx.split(model)
  y = jax.jit(lambda s: nnx.merge(graphdef, s)(x, h0)[0])(state)
  oracle = ORACLES[CASES[case][0]]
  ref = oracle(model, x, np.asarray(h0))
  err = max_err(y, ref)
  print(case, "max|y - oracle|:", err, "max|y|:", np.max(np.abs(ref)))
  assert err <= 1e-10, err
  if case == "s4d":
    # Power: the Euler discretisation of the same parameters is far off.
    assert max_err(s4d_oracle(model, x, np.asarray(h0), euler=True), ref) > 1e-3


# --- construction -------------------------------------------------------------


@pytest.mark.parametrize("name", linear_rnn.LAYERS)
def test_bad_impl_is_a_clear_error(name):
  with pytest.raises(ValueError, match=r"unknown impl 'cuda'.*sequential"):
    linear_rnn.layer_class(name)(D, rngs=nnx.Rngs(0), impl="cuda")


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown linear RNN layer"):
    linear_rnn.layer_class("mamba")
  with pytest.raises(ValueError, match="even"):
    linear_rnn.S4D(D, state_size=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divide"):
    linear_rnn.GateLoop(D, num_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="chunk"):
    linear_rnn.LRU(D, rngs=nnx.Rngs(0), chunk=0)


def test_init_state_layouts(x64):
  del x64
  expect = {"s4d": ((3, D, 4), np.complex64),
            "lru": ((3, 6), np.complex64),
            "gateloop": ((3, 2, 4, 4), np.float32),
            "gateloop_phase": ((3, 2, 4, 4), np.complex64)}
  for case, (shape, dtype) in expect.items():
    h = make(case, "float32").init_state(3)
    assert h.shape == shape and h.dtype == dtype and not np.any(h), case
  assert make("lru").init_state(1).dtype == np.complex128  # float64 params


def test_initialisations():
  """S4D-Lin A and the Delta range; the LRU ring and gamma = sqrt(1-|l|^2)."""
  s4d = linear_rnn.S4D(D, state_size=8, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(s4d.a_imag[...]),
                             np.broadcast_to(np.pi * np.arange(4), (D, 4)))
  np.testing.assert_allclose(np.exp(np.asarray(s4d.log_a_real[...])), 0.5)
  dt = np.exp(np.asarray(s4d.log_dt[...]))
  assert np.all((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6)))
  lru = linear_rnn.LRU(D, state_size=64, rngs=nnx.Rngs(0))
  lam = np.asarray(lru.eigenvalues(), np.complex128)
  r = np.abs(lam)
  assert np.all((r >= 0.9 - 1e-6) & (r <= 0.999 + 1e-6)), (r.min(), r.max())
  assert r.max() - r.min() > 0.05  # spread over the ring, not one radius
  np.testing.assert_allclose(np.exp(np.asarray(lru.gamma_log[...])),
                             np.sqrt(1 - r**2), rtol=1e-4)
