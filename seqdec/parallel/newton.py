"""Newton's method over the whole sequence: h_t = f(h_{t-1}, x_t) for all t.

The T states are the unknowns of one system of equations (DEER, ParaRNN):

    r_t(h) = h_t - f(h_{t-1}, x_t) = 0,   t = 0 .. T-1,   h_{-1} = h0.

Newton at the iterate h^k, with J_t = df/dh (h^k_{t-1}, x_t), solves the block
bidiagonal linear system for the correction delta,

    (1 + lam) delta_t - J_t delta_{t-1} = -r_t(h^k),   delta_{-1} = 0,

i.e. the affine recurrence delta_t = A_t delta_{t-1} + b_t with
A_t = J_t / (1 + lam), b_t = -r_t / (1 + lam), which `linear_scan` solves in
parallel; then h^{k+1} = h^k + delta. lam = 0 is plain Newton (each step makes
at least one more leading state exact, so T steps always suffice, and
contractive cells converge quadratically in a handful). lam > 0 damps: it
shrinks the step and the scan's maps (|A| < |J|), trading speed for
robustness on hard (near-chaotic) cases, in the spirit of ELK's
Levenberg-Marquardt damping; the fixed point is unchanged (delta = 0 iff
r = 0).

J has the cell's structure (`scan.STRUCTURES`): 'diagonal' (one
Jacobian-vector product with a vector of ones, valid when df/dh is diagonal),
'block2' (two JVPs, one per plane of a [.., 2, C] state) or 'dense' (C JVPs).

Convergence: the relative residual max|h - f(h_prev)| / max|f(h_prev)| <= tol,
or `max_iter` iterations (tol = 0 gives ParaRNN's fixed iteration count).
`NewtonInfo` reports iterations, the final residual and `converged`; a run
that stops at `max_iter` above tol is reported as not converged.

Gradients (implicit differentiation, `jax.custom_vjp`): at the solution
r(h*) = 0, so for a loss L(h*) the adjoint lambda solves the *linear* reverse
recurrence with the transposed Jacobians at h*,

    lambda_t = dL/dh_t + J_{t+1}^T lambda_{t+1},    lambda_T = 0,

one reverse `linear_scan`, no Newton iterations; then dL/d(params, x_t,
h_{t-1}) is the VJP of f at (h*_{t-1}, x_t) with cotangent lambda_t (so
dL/dh0 is its h_{t-1} part at t = 0). Nothing is differentiated through the
iterations.

The step function `f(params, h_prev, x) -> h` must act elementwise in time:
it is called on stacked [T, *B, ...] arrays (x may be a pytree of them) as
well as on single steps [*B, ...].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqdec.parallel import scan

Step = Callable[[Any, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class NewtonConfig:
  """How `solve` runs (hashable: a static argument under jit).

  Attributes:
    structure: Jacobian structure, 'diagonal' | 'block2' | 'dense'.
    impl: `linear_scan` back end for each Newton step and the adjoint.
    chunk: chunk length of the 'chunked' back end.
    tol: relative residual to stop at (0: always run `max_iter`).
    max_iter: iteration cap.
    damping: lam >= 0 (see the module docstring); 0 is plain Newton.
  """
  structure: str = "diagonal"
  impl: str = "auto"
  chunk: int = scan.DEFAULT_CHUNK
  tol: float = 1e-6
  max_iter: int = 16
  damping: float = 0.0

  def __post_init__(self):
    scan.ops_for(self.structure)  # raises on an unknown structure
    scan.resolve_impl(self.impl, self.structure, 1, self.chunk)
    if self.max_iter < 1:
      raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
    if self.tol < 0 or self.damping < 0:
      raise ValueError("tol and damping must be >= 0")


class NewtonInfo(NamedTuple):
  """What a solve did.

  Attributes:
    iterations: int32 [], Newton steps taken.
    residual: [], final max|h - f(h_prev)| / max|f(h_prev)|.
    converged: bool [], residual <= tol.
  """
  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array


def shift(h: jax.Array, h0: jax.Array) -> jax.Array:
  """h_prev: [T, ...] -> [h0, h_0, ..., h_{T-2}]."""
  return jnp.concatenate([h0[None].astype(h.dtype), h[:-1]], axis=0)


def _basis(structure: str, state: jax.Array) -> jax.Array:
  """Unit tangents, one per Jacobian column group: [n, *state.shape[-k:]]."""
  if structure == "diagonal":
    return jnp.ones((1, 1), state.dtype)
  if structure == "block2":
    return jnp.eye(2, dtype=state.dtype)[:, :, None]          # [2, 2, 1]
  return jnp.eye(state.shape[-1], dtype=state.dtype)          # [C, C]


def linearize(step: Step, params, h_prev: jax.Array, xs, structure: str):
  """f(h_prev, x) and its structured Jacobian J, both at every t at once.

  Returns:
    y: h_prev.shape, f(params, h_prev, x).
    J: diagonal h_prev.shape; block2 [..., 2, 2, C] with
      J[..., i, j, k] = d y[..., i, k] / d h_prev[..., j, k]; dense
      [..., C, C] with J[..., i, j] = d y_i / d h_prev_j.
  """
  f = lambda h: step(params, h, xs)
  basis = _basis(structure, h_prev)
  # One fused jvp per tangent (jax.linearize would store the residuals of f
  # in memory, which costs more than recomputing f here).
  tangent = lambda e: jax.jvp(f, (h_prev,),
                              (jnp.broadcast_to(e, h_prev.shape),))[1]
  y = f(h_prev)
  if structure == "diagonal":
    return y, tangent(basis[0])
  if structure == "block2":
    return y, jnp.stack([tangent(e) for e in basis], axis=-2)
  return y, jax.vmap(tangent, out_axes=-1)(basis)


def relative_residual(h: jax.Array, y: jax.Array) -> jax.Array:
  """max|h - y| / max|y| (0 / 0 counts as 0)."""
  scale = jnp.max(jnp.abs(y))
  err = jnp.max(jnp.abs(h - y))
  return jnp.where(scale > 0, err / jnp.where(scale > 0, scale, 1), err)


def _iterate(step: Step, config: NewtonConfig, params, xs, h0):
  """The Newton loop; returns (h, info, J at h)."""
  ops = scan.ops_for(config.structure)
  t = jax.tree.leaves(xs)[0].shape[0]
  impl = scan.resolve_impl(config.impl, config.structure, t, config.chunk)
  # Initial guess: every step from h0, h_t = f(h0, x_t) (exact at t = 0).
  h_init = step(params, jnp.broadcast_to(h0, (t,) + h0.shape), xs)
  y, jac = linearize(step, params, shift(h_init, h0), xs, config.structure)
  res = relative_residual(h_init, y)
  scale = 1.0 / (1.0 + config.damping)

  def cond(carry):
    k, _, _, _, res = carry
    return (k < config.max_iter) & (res > config.tol)

  def body(carry):
    k, h, y, jac, _ = carry
    a, b = (jac, y - h) if config.damping == 0 else (jac * scale,
                                                     (y - h) * scale)
    delta = scan.linear_scan(a, b, None, structure=ops.name, impl=impl,
                             chunk=config.chunk)
    h = h + delta
    y, jac = linearize(step, params, shift(h, h0), xs, config.structure)
    return k + 1, h, y, jac, relative_residual(h, y)

  k, h, _, jac, res = lax.while_loop(
      cond, body, (jnp.int32(0), h_init, y, jac, res))
  return h, NewtonInfo(k, res, res <= config.tol), jac


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solve(step, config, params, xs, h0):
  h, info, _ = _iterate(step, config, params, xs, h0)
  return h, info


def _solve_fwd(step, config, params, xs, h0):
  h, info, jac = _iterate(step, config, params, xs, h0)
  return (h, info), (params, xs, h0, h, jac)


def adjoint(jac: jax.Array, g: jax.Array, structure: str, impl: str,
            chunk: int) -> jax.Array:
  """lambda_t = g_t + J_{t+1}^T lambda_{t+1} (lambda_T = 0): one reverse scan."""
  ops = scan.ops_for(structure)
  jt = ops.transpose(jac)
  a = jnp.concatenate([jt[1:], jnp.zeros_like(jt[:1])], axis=0)
  return scan.linear_scan(a, g, None, structure=structure, impl=impl,
                          reverse=True, chunk=chunk)


def _solve_bwd(step, config, residuals, cotangents):
  params, xs, h0, h, jac = residuals
  g = cotangents[0]  # the NewtonInfo outputs carry no gradient
  impl = scan.resolve_impl(config.impl, config.structure, h.shape[0],
                           config.chunk)
  lam = adjoint(jac, g.astype(h.dtype), config.structure, impl, config.chunk)
  _, vjp = jax.vjp(step, params, shift(h, h0), xs)
  d_params, d_hprev, d_xs = vjp(lam)
  return d_params, d_xs, d_hprev[0].astype(h0.dtype)


_solve.defvjp(_solve_fwd, _solve_bwd)


def solve(step: Step, params, xs, h0: jax.Array,
          config: NewtonConfig = NewtonConfig()
          ) -> tuple[jax.Array, NewtonInfo]:
  """All states of h_t = step(params, h_{t-1}, x_t) by Newton's method.

  Args:
    step: f(params, h_prev, x) -> h, elementwise in time (module docstring).
    params: pytree of parameters (differentiable).
    xs: pytree of per-step inputs, each [T, *B, ...] (differentiable).
    h0: [*B, ...] (diagonal, dense: [*B, C]; block2: [*B, 2, C]).
    config: `NewtonConfig` (static).

  Returns:
    h: [T, *h0.shape], the states (dtype of f's output).
    info: `NewtonInfo`. Differentiable in params, xs and h0 through the
      implicit-function VJP (reverse mode only).
  """
  leaves = jax.tree.leaves(xs)
  if not leaves or any(x.ndim < 1 for x in leaves):
    raise ValueError("xs must be a non-empty pytree of [T, ...] arrays")
  t = leaves[0].shape[0]
  if any(x.shape[0] != t for x in leaves):
    raise ValueError(f"every leaf of xs needs the same T, got "
                     f"{[x.shape[0] for x in leaves]}")
  if t == 0:
    raise ValueError("xs has T = 0 steps")
  return _solve(step, config, params, xs, h0)


def rollout(step: Step, params, xs, h0: jax.Array) -> jax.Array:
  """The sequential reference: `lax.scan` of step over t. [T, *h0.shape]."""
  def body(h, x):
    h = step(params, h, x)
    return h, h
  return lax.scan(body, h0, xs)[1]


def max_jacobian_norm(step: Step, params, xs, h: jax.Array, h0: jax.Array,
                      structure: str) -> jax.Array:
  """max_t ||J_t||_2 along a trajectory h (per channel block / whole matrix).

  Diagonal: max|J|; block2: the largest 2x2 block's spectral norm; dense: the
  largest matrix spectral norm. Below 1 everywhere means contractive.
  """
  _, jac = linearize(step, params, shift(h, h0), xs, structure)
  if structure == "diagonal":
    return jnp.max(jnp.abs(jac))
  if structure == "block2":
    jac = jnp.moveaxis(jac, -1, -3)  # [..., C, 2, 2]
  return jnp.max(jnp.linalg.norm(jac, ord=2, axis=(-2, -1)))
