"""`seqdec.parallel.newton`: Newton solutions and implicit gradients vs `lax.scan`.

Oracle: the sequential rollout of the same cell step (and autodiff through it).
Error measure: per sequence max|delta| / max|ref|, worst row (as in
test_scan). Bounds: states f32 1e-5, f64 1e-10; gradients f32 1e-4, f64 1e-9.
"Larger" weights scale the recurrent weights by 2: max||J|| is printed and is
above the initial one, yet Newton still converges; chaotic weights appear only
in the non-convergence test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from seqdec.models import rnn
from seqdec.parallel import newton

B, D, H = 2, 6, 8


def rel_error(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if out.ndim < 2:
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  axes = tuple(i for i in range(out.ndim) if i != 1)
  return float(np.max(np.max(np.abs(out - ref), axis=axes)
                      / np.max(np.abs(ref), axis=axes)))


def problem(cell, t, dtype, scale=1.0, seed=0, h=H):
  """(step, params, u [T, B, 3, H], h0, structure) for one cell."""
  c = rnn.Cell(cell, D, h, rngs=nnx.Rngs(seed), recurrent_scale=scale,
               param_dtype=dtype)
  x = jax.random.normal(jax.random.key(seed + 1), (t, B, D), dtype)
  h0 = 0.5 * jax.random.normal(jax.random.key(seed + 2), c.init_state(B).shape,
                               dtype)
  return c.kind.step, c.params(), c.project(x), h0, c.kind.structure


def loss(hs):
  """A loss that weighs every state differently."""
  w = jnp.cos(jnp.arange(hs.size, dtype=hs.dtype).reshape(hs.shape))
  return jnp.sum(w * jnp.tanh(hs))


@functools.partial(jax.jit, static_argnums=(0, 4))
def solve_and_grads(step, params, u, h0, config):
  """States and d loss / d(params, u, h0), parallel and sequential."""
  def par(p, u, h0):
    hs, info = newton.solve(step, p, u, h0, config)
    return loss(hs), (hs, info)

  def seq(p, u, h0):
    hs = newton.rollout(step, p, u, h0)
    return loss(hs), hs
  (_, (hs, info)), g_par = jax.value_and_grad(par, (0, 1, 2), has_aux=True)(
      params, u, h0)
  (_, ref), g_seq = jax.value_and_grad(seq, (0, 1, 2), has_aux=True)(
      params, u, h0)
  norm = newton.max_jacobian_norm(step, params, u, ref, h0, config.structure)
  return hs, info, ref, g_par, g_seq, norm


def check(cell, t, dtype, scale, state_bound, grad_bound, tol, max_iter=16):
  step, params, u, h0, structure = problem(cell, t, dtype, scale)
  config = newton.NewtonConfig(structure=structure, impl="chunked", chunk=16,
                               tol=tol, max_iter=max_iter)
  hs, info, ref, g_par, g_seq, norm = solve_and_grads(step, params, u, h0,
                                                      config)
  state_err = rel_error(hs, ref)
  grad_err = max(rel_error(a, b) for a, b in
                 zip(jax.tree.leaves(g_par), jax.tree.leaves(g_seq)))
  print(f"{cell} x{scale} T={t} {jnp.dtype(dtype).name}: "
        f"{int(info.iterations)} iterations, residual "
        f"{float(info.residual):.1e}, max||J|| {float(norm):.3f}, state err "
        f"{state_err:.1e}, grad err {grad_err:.1e}")
  assert bool(info.converged) and float(info.residual) <= tol
  assert state_err <= state_bound
  assert grad_err <= grad_bound
  return int(info.iterations), float(norm)


@pytest.mark.parametrize("cell", [
    "paragru", "paralstm", pytest.param("gru", marks=pytest.mark.slow)])
def test_newton_equals_rollout_f32(cell):
  iters, norm = check(cell, 64, jnp.float32, 1.0, 1e-5, 1e-4, 1e-6)
  iters2, norm2 = check(cell, 64, jnp.float32, 2.0, 1e-5, 1e-4, 1e-6)
  assert norm2 > norm  # the "larger" weights really are larger
  assert iters <= 8 and iters2 <= 16


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(rnn.CELLS))
def test_newton_equals_rollout_f64(x64, cell):
  check(cell, 64, jnp.float64, 1.0, 1e-10, 1e-9, 1e-12, max_iter=64)
  check(cell, 64, jnp.float64, 2.0, 1e-10, 1e-9, 1e-12, max_iter=64)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["paragru", "paralstm"])
def test_iterations_at_t4097_f32(cell):
  """ParaRNN reports 3 iterations; the bound here is 8 at initialisation."""
  iters, _ = check(cell, 4097, jnp.float32, 1.0, 1e-5, 1e-4, 1e-6)
  assert iters <= 8


@pytest.mark.slow
def test_dense_gru_t4097_f32():
  check("gru", 4097, jnp.float32, 1.0, 1e-5, 1e-4, 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("cell", list(rnn.CELLS))
def test_check_grads_f64(x64, cell):
  """Numerical vs implicit (custom_vjp) gradients, reverse mode, order 1."""
  step, params, u, h0, structure = problem(cell, 12, jnp.float64, h=4)
  config = newton.NewtonConfig(structure=structure, impl="associative",
                               tol=1e-13, max_iter=64)
  fn = jax.jit(lambda p, u, h0: loss(newton.solve(step, p, u, h0, config)[0]))
  check_grads(fn, (params, u, h0), order=1, modes=("rev",), atol=1e-7,
              rtol=1e-7, eps=1e-6)


def test_non_convergence_is_reported():
  """Chaotic weights and a tiny cap: converged is False, residual > tol."""
  step, params, u, h0, structure = problem("gru", 256, jnp.float32, scale=6.0)
  config = newton.NewtonConfig(structure=structure, impl="sequential",
                               tol=1e-6, max_iter=4)
  hs, info = jax.jit(newton.solve, static_argnums=(0, 4))(step, params, u, h0,
                                                          config)
  ref = newton.rollout(step, params, u, h0)
  print(f"chaotic gru: {int(info.iterations)} iterations, residual "
        f"{float(info.residual):.2e}, state err {rel_error(hs, ref):.2e}")
  assert int(info.iterations) == 4
  assert not bool(info.converged) and float(info.residual) > 1e-6
  assert rel_error(hs, ref) > 1e-3  # really not the solution


def test_iteration_cap_and_fixed_count():
  """max_iter=1 on a normal cell is not converged; tol=0 runs max_iter."""
  step, params, u, h0, structure = problem("paragru", 64, jnp.float32)
  solve = jax.jit(newton.solve, static_argnums=(0, 4))
  _, info = solve(step, params, u, h0, newton.NewtonConfig(max_iter=1))
  assert int(info.iterations) == 1 and not bool(info.converged)
  _, info = solve(step, params, u, h0, newton.NewtonConfig(tol=0.0,
                                                           max_iter=3))
  assert int(info.iterations) == 3


def test_damping_converges_to_the_same_solution():
  step, params, u, h0, structure = problem("paralstm", 64, jnp.float32)
  solve = jax.jit(newton.solve, static_argnums=(0, 4))
  plain = newton.NewtonConfig(structure=structure)
  damped = newton.NewtonConfig(structure=structure, damping=0.5, max_iter=64)
  h1, i1 = solve(step, params, u, h0, plain)
  h2, i2 = solve(step, params, u, h0, damped)
  assert bool(i1.converged) and bool(i2.converged)
  assert int(i2.iterations) > int(i1.iterations)
  assert rel_error(h2, newton.rollout(step, params, u, h0)) <= 1e-5


def test_jacobian_structures_match_autodiff():
  """linearize's structured J equals the dense jacfwd of one step."""
  patterns = {"diagonal": "bkbk->bk", "block2": "bikbjk->bijk",
              "dense": "bibj->bij"}
  for cell in rnn.CELLS:
    step, params, u, h0, structure = problem(cell, 1, jnp.float32)
    _, jac = newton.linearize(step, params, h0[None], u, structure)
    full = np.asarray(jax.jacfwd(lambda h: step(params, h, u[0]))(h0))
    want = np.einsum(patterns[structure], full)
    np.testing.assert_allclose(jac[0], want, atol=1e-6)
    assert np.max(np.abs(want)) > 0.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(structure="triangular"), "structure"),
    (dict(impl="magic"), "impl"),
    (dict(max_iter=0), "max_iter"),
    (dict(tol=-1.0), "tol"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    newton.NewtonConfig(**kwargs)


def test_bad_inputs():
  step, params, u, h0, _ = problem("paragru", 4, jnp.float32)
  with pytest.raises(ValueError, match="same T"):
    newton.solve(step, params, (u, u[:2]), h0)
  with pytest.raises(ValueError, match="T = 0"):
    newton.solve(step, params, u[:0], h0)
