"""Diagonal linear-recurrence layers: S4D, LRU and GateLoop.

Shapes (`seqdec.shapes`): B batch rows, T time steps, D model width, C
recurrent-state channels (complex modes for S4D / LRU), H heads, Dh head size.
A layer maps x [B, T, D] -> y [B, T, D] (batch-major, like the transformer);
the scan inside is time-major.

Each layer is one instance of the same pattern (`DiagonalRecurrence`): per
token, elementwise in time, coefficients

    (a_t, b_t) = coefficients(x_t),      h_t = a_t * h_{t-1} + b_t,
    y_t = readout(h_t, x_t),

with `*` elementwise over the state (a diagonal transition). `__call__` is the
parallel form (training, prefill): all (a_t, b_t) at once, one
`seqdec.parallel.scan.linear_scan(structure='diagonal', impl=...)`, readout of
every state. `step` is the recurrent form (decoding): the same coefficients
for one token and one multiply-add. Both start from and return an explicit
state (`init_state(batch_size)`: zeros), so a prompt can be prefilled in
parallel and continued step by step.

  S4D       time-invariant a = exp(Delta A) per channel and complex mode
            (ZOH), b_t = Bbar x_t; y = 2 Re(C h) + D_skip x.   state [B, D, C]
  LRU       time-invariant complex lambda per state channel, b_t = gamma *
            (B x_t); y = Re(C h) + D_skip x.                   state [B, C]
  GateLoop  data-controlled a_t = sigmoid(W_a x_t) per head and key channel
            (optionally times exp(i W_theta x_t)), b_t = k_t v_t^T;
            y = q_t h_t.                                 state [B, H, Dh, Dh]

Complex states. S4D and LRU (and GateLoop with `phase=True`) have complex
diagonal transitions. They are scanned as native complex arrays with the
'diagonal' structure: `linear_scan` is dtype-generic (its accumulation dtype,
`promote_types(dtype, float32)`, keeps complex64 / complex128, and every back
end only multiplies and adds), and this module's tests check all three back
ends against the step form and independent NumPy oracles. The alternative,
a complex multiply as a real 2x2 rotation-scaling block ('block2', planar
(Re, Im) state), does twice the multiplies per combine (the general 2x2
compose ignores the rotation structure) and measured slower to compile here
(associative: 0.27 s vs 0.15 s for the same recurrence); 'auto' also picks
the in-place 'chunked' back end only for 'diagonal'. Two independent real
channels cannot represent it at all (Re and Im couple through the phase).
Caveat: complex is unavailable in bfloat16 and in Pallas kernels, so a future
Pallas back end would need the block2 layout. Parameters are real (complex
ones stored planar, [2, ...] = (Re, Im)); states have dtype
`complex_dtype(dtype)` (complex64 for float32, complex128 for float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.parallel import scan


def complex_dtype(dtype) -> jnp.dtype:
  """The complex type of a real float type: float32 -> complex64, float64 ->
  complex128."""
  return jnp.result_type(jnp.dtype(dtype), jnp.complex64)


def _planar_complex(p: jax.Array) -> jax.Array:
  """A complex array from planar real storage: p [2, ...] -> p[0] + i p[1]."""
  return jax.lax.complex(p[0], p[1])


def diagonal_recurrence(a: jax.Array, b: jax.Array, h0: jax.Array, *,
                        impl: str, chunk: int) -> jax.Array:
  """All states of h_t = a_t * h_{t-1} + b_t (elementwise), t = 0 .. T-1.

  Args:
    a: [T, B, *S] or anything broadcastable to b (a time-invariant
      transition, or one shared over the trailing value axis).
    b: [T, B, *S].
    h0: [B, *S], the state before step 0.
    impl, chunk: the `linear_scan` back end.

  Returns:
    h [T, B, *S], dtype of b: h[t] is the state after token t.
  """
  a = jnp.broadcast_to(a, b.shape)
  return scan.linear_scan(a, b, h0, structure="diagonal", impl=impl,
                          chunk=chunk)


class DiagonalRecurrence(nnx.Module):
  """A layer h_t = a_t * h_{t-1} + b_t, y_t = readout(h_t, x_t).

  Subclasses implement `coefficients` and `readout` (both elementwise in time:
  they are called on [T, B, ...] and on [B, ...] inputs) and set
  `state_shape`; this class provides the parallel form, the step form and the
  zero state.

  Attributes:
    dtype: parameter and compute dtype (float32 or float64).
    state_dtype: dtype of the state (complex for complex transitions).
    state_shape: the state of one batch row (e.g. (D, C)).
    impl: `linear_scan` back end ('sequential' | 'associative' | 'chunked' |
      'auto').
    chunk: chunk length of the 'chunked' back end.
  """

  dtype: jnp.dtype
  state_dtype: jnp.dtype
  state_shape: tuple[int, ...]
  impl: str
  chunk: int

  def _configure(self, dtype, state_dtype, state_shape: tuple[int, ...],
                 impl: str, chunk: int) -> None:
    """Sets and validates the shared attributes (a bad impl fails here)."""
    if chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {chunk}")
    scan.resolve_impl(impl, "diagonal", 1, chunk)  # ValueError if unknown
    self.dtype = jnp.dtype(dtype)
    if self.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
      raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    self.state_dtype = jnp.dtype(state_dtype)
    self.state_shape = tuple(state_shape)
    self.impl = impl
    self.chunk = chunk

  def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (a broadcastable to b, b [..., *state_shape])."""
    raise NotImplementedError

  def readout(self, h: jax.Array, x: jax.Array) -> jax.Array:
    """h [..., *state_shape], x [..., D] -> y [..., D] (real, `dtype`)."""
    raise NotImplementedError

  def init_state(self, batch_size: int) -> jax.Array:
    """Zeros [B, *state_shape] of `state_dtype`."""
    return jnp.zeros((batch_size,) + self.state_shape, self.state_dtype)

  def _coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = self.coefficients(x)
    return a.astype(self.state_dtype), b.astype(self.state_dtype)

  def __call__(self, x: jax.Array, h0: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Parallel form: x [B, T, D], h0 [B, *S] or None (zeros) ->
    (y [B, T, D], h_T [B, *S], the state after the last token)."""
    x = jnp.asarray(x, self.dtype)
    if h0 is None:
      h0 = self.init_state(x.shape[0])
    h0 = jnp.asarray(h0, self.state_dtype)
    xt = jnp.swapaxes(x, 0, 1)                                   # [T, B, D]
    a, b = self._coefficients(xt)
    h = diagonal_recurrence(a, b, h0, impl=self.impl, chunk=self.chunk)
    y = jnp.swapaxes(self.readout(h, xt), 0, 1)
    return y, (h[-1] if h.shape[0] else h0)

  def step(self, x: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Recurrent form: x [B, D], h [B, *S] -> (y [B, D], h' [B, *S])."""
    x = jnp.asarray(x, self.dtype)
    a, b = self._coefficients(x)
    h = a * jnp.asarray(h, self.state_dtype) + b
    return self.readout(h, x), h


# --- S4D ----------------------------------------------------------------------


def zoh(a: jax.Array, b: jax.Array, log_dt: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
  """Zero-order-hold discretisation of x'(t) = A x(t) + B u(t), diagonal A.

  With the step Delta = exp(log_dt), holding u constant over a step,

      Abar = exp(Delta A),     Bbar = (exp(Delta A) - 1) / A * B,

  (exact for piecewise-constant input; A != 0 because Re A < 0 here).

  Args:
    a: [D, C] complex, the continuous diagonal A of each channel.
    b: [D, C] complex, B.
    log_dt: [D] real.

  Returns:
    (Abar [D, C], Bbar [D, C]), complex.
  """
  abar = jnp.exp(jnp.exp(log_dt)[:, None] * a)
  return abar, (abar - 1) / a * b


class S4D(DiagonalRecurrence):
  """S4D (Gu et al. 2022): a diagonal state space model per channel, ZOH.

  Each channel d of x runs its own single-input single-output SSM with C
  complex modes (the paper's state size N = 2C, of which the conjugate half
  is implied by taking twice the real part):

      A = -exp(log_a_real) + i a_imag              [D, C]
      (Abar, Bbar) = zoh(A, B, log_dt)             (see `zoh`)
      h_t = Abar * h_{t-1} + Bbar x_t              [B, D, C] complex
      y_t = 2 Re(sum_c C_dc h_{t,dc}) + D_skip x_t

  Time-invariant, so y is also the causal convolution of x with the kernel
  K_k = 2 Re(sum_c C Abar^k Bbar) (plus D_skip at lag 0).

  Initialisation (S4D-Lin): A_real = 1/2, A_imag = pi n (n = 0 .. C-1),
  B = 1, C complex standard normal (variance 1/2 per part), Delta
  log-uniform in [dt_min, dt_max] per channel, D_skip standard normal.

  Attributes:
    log_dt: [D] log step sizes.
    log_a_real: [D, C]; Re A = -exp(log_a_real) < 0 (stable).
    a_imag: [D, C]; Im A.
    b: [2, D, C] planar complex B.
    c: [2, D, C] planar complex C.
    skip: [D] D_skip.
  """

  def __init__(self, d_model: int, state_size: int = 64, *,
               rngs: nnx.Rngs, dt_min: float = 1e-3, dt_max: float = 1e-1,
               dtype="float32", impl: str = "auto",
               chunk: int = scan.DEFAULT_CHUNK):
    """Args: d_model D; state_size the paper's N (even): C = N / 2 modes."""
    if state_size < 2 or state_size % 2:
      raise ValueError(f"state_size must be even and >= 2, got {state_size}")
    modes = state_size // 2
    dt = jnp.dtype(dtype)
    self._configure(dt, complex_dtype(dt), (d_model, modes), impl, chunk)
    k_dt, k_c, k_d = jax.random.split(rngs.params(), 3)
    u = jax.random.uniform(k_dt, (d_model,), dt)
    self.log_dt = nnx.Param(math.log(dt_min)
                            + u * (math.log(dt_max) - math.log(dt_min)))
    self.log_a_real = nnx.Param(jnp.full((d_model, modes), math.log(0.5), dt))
    self.a_imag = nnx.Param(jnp.broadcast_to(
        jnp.pi * jnp.arange(modes, dtype=dt), (d_model, modes)))
    self.b = nnx.Param(jnp.stack([jnp.ones((d_model, modes), dt),
                                  jnp.zeros((d_model, modes), dt)]))
    self.c = nnx.Param(jax.random.normal(k_c, (2, d_model, modes), dt)
                       * math.sqrt(0.5))
    self.skip = nnx.Param(jax.random.normal(k_d, (d_model,), dt))

  def continuous_a(self) -> jax.Array:
    """A = -exp(log_a_real) + i a_imag, [D, C] complex."""
    return jax.lax.complex(-jnp.exp(self.log_a_real[...]), self.a_imag[...])

  def discretised(self) -> tuple[jax.Array, jax.Array]:
    """(Abar, Bbar), each [D, C] complex (`zoh`)."""
    return zoh(self.continuous_a(), _planar_complex(self.b[...]),
               self.log_dt[...])

  def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (Abar [D, C], Bbar x [..., D, C])."""
    abar, bbar = self.discretised()
    return abar, bbar * x[..., None]

  def readout(self, h: jax.Array, x: jax.Array) -> jax.Array:
    """y = 2 Re(sum_c C_dc h_dc) + D_skip x: h [..., D, C] -> [..., D]."""
    ch = jnp.sum(_planar_complex(self.c[...]) * h, axis=-1)
    return (2 * jnp.real(ch)).astype(self.dtype) + self.skip[...] * x


# --- LRU ----------------------------------------------------------------------


def lru_lambda(nu_log: jax.Array, theta_log: jax.Array) -> jax.Array:
  """The exponential parameterisation of the LRU's eigenvalues,

      lambda = exp(-exp(nu_log) + i exp(theta_log)),

  so |lambda| = exp(-exp(nu_log)) < 1 for every real nu_log (stable by
  construction) and arg lambda = exp(theta_log).

  Args:
    nu_log, theta_log: [C] real.

  Returns:
    lambda [C] complex.
  """
  return jnp.exp(jax.lax.complex(-jnp.exp(nu_log), jnp.exp(theta_log)))


def ring_init(key: jax.Array, size: int, r_min: float, r_max: float,
              max_phase: float, dtype) -> tuple[jax.Array, jax.Array]:
  """(nu_log, theta_log) [C] with lambda uniform on the ring r_min <= |lambda|
  <= r_max, 0 <= arg lambda <= max_phase (Orvieto et al. 2023, Lemma 3.2):

      |lambda|^2 = u1 (r_max^2 - r_min^2) + r_min^2,
      nu_log = log(-log |lambda|),   theta_log = log(max_phase u2),

  with u1, u2 ~ U(0, 1) (uniform density over the ring's area).
  """
  k1, k2 = jax.random.split(key)
  u1 = jax.random.uniform(k1, (size,), dtype)
  u2 = jax.random.uniform(k2, (size,), dtype)
  nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
  return nu_log, jnp.log(max_phase * u2)


class LRU(DiagonalRecurrence):
  """Linear Recurrent Unit (Orvieto et al. 2023), exponential parameterisation.

      lambda = lru_lambda(nu_log, theta_log)       [C] complex
      gamma = exp(gamma_log)                       [C], init sqrt(1-|lambda|^2)
      h_t = lambda * h_{t-1} + gamma * (B x_t)     [B, C] complex, B [C, D]
      y_t = Re(C h_t) + D_skip * x_t               C [D, C] complex

  gamma normalises the state: with white input of unit variance, the
  stationary variance of (lambda h + sqrt(1 - |lambda|^2) u) stays that of u.
  It is a learned parameter initialised to that value (as in the paper's
  reference code), not recomputed from lambda.

  Initialisation: lambda uniform on the ring [r_min, r_max] x [0, max_phase]
  (`ring_init`); B, C complex Glorot-like normal, Re and Im each with
  variance 1 / (2 D) for B and 1 / C for C; D_skip standard normal.

  Attributes:
    nu_log, theta_log, gamma_log: [C].
    b: [2, C, D] planar complex B.
    c: [2, D, C] planar complex C.
    skip: [D] D_skip.
  """

  def __init__(self, d_model: int, state_size: int = 64, *,
               rngs: nnx.Rngs, r_min: float = 0.9, r_max: float = 0.999,
               max_phase: float = 2 * math.pi, dtype="float32",
               impl: str = "auto", chunk: int = scan.DEFAULT_CHUNK):
    """Args: d_model D (input = output width); state_size C complex."""
    if not 0 <= r_min < r_max <= 1:
      raise ValueError(f"need 0 <= r_min < r_max <= 1, got {r_min}, {r_max}")
    dt = jnp.dtype(dtype)
    self._configure(dt, complex_dtype(dt), (state_size,), impl, chunk)
    k_ring, k_b, k_c, k_d = jax.random.split(rngs.params(), 4)
    nu_log, theta_log = ring_init(k_ring, state_size, r_min, r_max,
                                  max_phase, dt)
    self.nu_log = nnx.Param(nu_log)
    self.theta_log = nnx.Param(theta_log)
    modulus = jnp.abs(lru_lambda(nu_log, theta_log))
    self.gamma_log = nnx.Param(0.5 * jnp.log(1 - modulus**2))
    self.b = nnx.Param(jax.random.normal(k_b, (2, state_size, d_model), dt)
                       / math.sqrt(2 * d_model))
    self.c = nnx.Param(jax.random.normal(k_c, (2, d_model, state_size), dt)
                       / math.sqrt(state_size))
    self.skip = nnx.Param(jax.random.normal(k_d, (d_model,), dt))

  def eigenvalues(self) -> jax.Array:
    """lambda [C] complex (`lru_lambda`)."""
    return lru_lambda(self.nu_log[...], self.theta_log[...])

  def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (lambda [C], gamma * (B x) [..., C])."""
    bx = jnp.einsum("...d,cd->...c", x, _planar_complex(self.b[...]))
    return self.eigenvalues(), jnp.exp(self.gamma_log[...]) * bx

  def readout(self, h: jax.Array, x: jax.Array) -> jax.Array:
    """y = Re(C h) + D_skip * x: h [..., C] -> [..., D]."""
    ch = jnp.einsum("...c,dc->...d", h, _planar_complex(self.c[...]))
    return jnp.real(ch).astype(self.dtype) + self.skip[...] * x


# --- GateLoop -----------------------------------------------------------------


class GateLoop(DiagonalRecurrence):
  """GateLoop (Katsch 2023): linear attention with data-controlled decay.

  Per head (H heads of size Dh = D / H), with q_t, k_t, v_t [Dh] the head's
  slices of linear maps of x_t:

      a_t = sigmoid(W_a x_t + b_a)                 [H, Dh] in (0, 1)
            (* exp(i W_theta x_t) if `phase`)
      h_t = a_t * h_{t-1} + k_t v_t^T              [B, H, Dh, Dh] (key, value)
      y_t = q_t h_t / sqrt(Dh)                     [H, Dh] -> concat [D]
            (Re of it if `phase`)

  The decay is diagonal over the key channel and shared over the value
  channel (a_t broadcasts over the last state axis). Unrolled, this is the
  attention-like form

      y_t = sum_{s <= t} sum_i q_{t,i} (prod_{s < r <= t} a_{r,i}) k_{s,i} v_s

  (the paper's surrogate-attention mode), which the tests use as the oracle.

  Deviation from the paper, documented: the default is the real-valued
  simplification (a_t in (0, 1), real state); the paper's complex
  data-controlled transition is `phase=True` (magnitude sigmoid(W_a x_t),
  phase W_theta x_t, complex state, y = Re(q_t h_t)). q, k, v stay real and
  there is no output projection or output gate: channel mixing across heads
  belongs to the surrounding block, as for S4D and LRU. q is scaled by
  1 / sqrt(Dh) as in attention. The parallel form materialises every state
  [T, B, H, Dh, Dh] (a chunked attention form would avoid it).

  Initialisation: q, k, v, W_a, W_theta LeCun normal; the gate bias b_a =
  logit(r) with r spread linearly over [r_min, r_max] across each head's key
  channels, so the decays start at a range of time scales.

  Attributes:
    num_heads: H.
    head_size: Dh.
    phase: whether the decay has a data-controlled complex phase.
    q, k, v, gate: nnx.Linear D -> D (gate has the bias b_a).
    theta: nnx.Linear D -> D (W_theta), only if `phase`.
  """

  def __init__(self, d_model: int, num_heads: int = 1, *, rngs: nnx.Rngs,
               phase: bool = False, r_min: float = 0.9, r_max: float = 0.999,
               dtype="float32", impl: str = "auto",
               chunk: int = scan.DEFAULT_CHUNK):
    if num_heads < 1 or d_model % num_heads:
      raise ValueError(f"num_heads {num_heads} must divide d_model "
                       f"{d_model}")
    if not 0 < r_min <= r_max < 1:
      raise ValueError(f"need 0 < r_min <= r_max < 1, got {r_min}, {r_max}")
    dt = jnp.dtype(dtype)
    head = d_model // num_heads
    self._configure(dt, complex_dtype(dt) if phase else dt,
                    (num_heads, head, head), impl, chunk)
    self.num_heads, self.head_size, self.phase = num_heads, head, phase

    def linear(bias: bool) -> nnx.Linear:
      return nnx.Linear(d_model, d_model, use_bias=bias, param_dtype=dt,
                        rngs=rngs)
    self.q, self.k, self.v = linear(False), linear(False), linear(False)
    self.gate = linear(True)
    r = np.linspace(r_min, r_max, head)
    self.gate.bias[...] = jnp.asarray(np.tile(np.log(r / (1 - r)), num_heads),
                                      dt)
    self.theta = linear(False) if phase else None

  def heads(self, z: jax.Array) -> jax.Array:
    """[..., D] -> [..., H, Dh]."""
    return z.reshape(z.shape[:-1] + (self.num_heads, self.head_size))

  def decay(self, x: jax.Array) -> jax.Array:
    """a_t: x [..., D] -> [..., H, Dh], real in (0, 1), or complex with
    |a_t| in (0, 1) if `phase`."""
    a = jax.nn.sigmoid(self.heads(self.gate(x)))
    if self.phase:
      a = a * jnp.exp(1j * self.heads(self.theta(x)))
    return a

  def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (a [..., H, Dh, 1], k v^T [..., H, Dh, Dh])."""
    k, v = self.heads(self.k(x)), self.heads(self.v(x))
    return self.decay(x)[..., None], k[..., :, None] * v[..., None, :]

  def readout(self, h: jax.Array, x: jax.Array) -> jax.Array:
    """y = q h / sqrt(Dh), heads concatenated: [..., H, Dh, Dh] -> [..., D]."""
    q = self.heads(self.q(x)) / math.sqrt(self.head_size)
    y = jnp.real(jnp.einsum("...hi,...hij->...hj", q, h)).astype(self.dtype)
    return y.reshape(y.shape[:-2] + (self.num_heads * self.head_size,))


LAYERS = {"s4d": S4D, "lru": LRU, "gateloop": GateLoop}


def layer_class(name: str) -> type[DiagonalRecurrence]:
  """The layer class of a name in `LAYERS`; a clear error for unknown ones."""
  return scan.pick(LAYERS, name, "linear RNN layer")
