"""Recurrent cells that train in parallel over time, and an RNN language model.

Shapes (`seqdec.shapes`): T time steps, B batch rows, D model width, C cell channels,
V vocabulary, L layers. Cells work time-major ([T, B, ...]).

Cells (`CELLS`, chosen by string), each a pure step h_t = f(h_{t-1}, u_t) of
its input projection u_t = W x_t + bias (computed for all t at once, outside
the recurrence), with sigma the logistic function:

  'paragru'   ParaGRU (ParaRNN): diagonal recurrent weights a_z, a_r, a_c [C],
              z = sigma(a_z h + u_z), r = sigma(a_r h + u_r),
              c = tanh(a_c (r h) + u_c), h' = z c + (1 - z) h.
              df/dh is diagonal.
  'paralstm'  ParaLSTM (ParaRNN's CIFG LSTM with peepholes), state (c, h) as
              planes [.., 2, C]: f = sigma(a_f h + p_f c + u_f),
              c~ = tanh(a_c h + u_c), c' = f c + (1 - f) c~,
              o = sigma(a_o h + p_o c' + u_o), h' = o tanh(c').
              df/d(c, h) is 2x2 block-diagonal over channels.
  'gru'       classic GRU with dense recurrent matrices U [3, C, C] (DEER's
              case): z = sigma(h U_z + u_z), r = sigma(h U_r + u_r),
              c = tanh((r h) U_c + u_c), h' = z c + (1 - z) h. Dense df/dh.

Channel mixing in the Para cells comes from the input projection and the MLPs
between layers. Each cell runs in `mode` 'sequential' (`lax.scan`, the
reference) or 'parallel' (`seqdec.parallel.newton.solve`, with the cell's
Jacobian structure), and has a single-step `step` for decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.parallel import newton
from seqdec.parallel import scan

MODES = ("sequential", "parallel")


# --- cell steps (pure; elementwise in time) -----------------------------------


def paragru_step(params, h: jax.Array, u: jax.Array) -> jax.Array:
  """ParaGRU: params {'a': [3, C]}, h [..., C], u [..., 3, C] -> [..., C]."""
  a = params["a"]
  z = jax.nn.sigmoid(a[0] * h + u[..., 0, :])
  r = jax.nn.sigmoid(a[1] * h + u[..., 1, :])
  c = jnp.tanh(a[2] * (r * h) + u[..., 2, :])
  return h + z * (c - h)


def paralstm_step(params, s: jax.Array, u: jax.Array) -> jax.Array:
  """ParaLSTM-CIFG: params {'a': [3, C], 'p': [2, C]}, s [..., 2, C] (c, h),
  u [..., 3, C] -> [..., 2, C]."""
  a, p = params["a"], params["p"]
  c, h = s[..., 0, :], s[..., 1, :]
  f = jax.nn.sigmoid(a[0] * h + p[0] * c + u[..., 0, :])
  c_new = jnp.tanh(a[1] * h + u[..., 1, :])
  c_new = c_new + f * (c - c_new)
  o = jax.nn.sigmoid(a[2] * h + p[1] * c_new + u[..., 2, :])
  return jnp.stack([c_new, o * jnp.tanh(c_new)], axis=-2)


def gru_step(params, h: jax.Array, u: jax.Array) -> jax.Array:
  """Dense GRU: params {'u': [3, C, C]}, h [..., C], u [..., 3, C]."""
  w = params["u"]
  z = jax.nn.sigmoid(h @ w[0] + u[..., 0, :])
  r = jax.nn.sigmoid(h @ w[1] + u[..., 1, :])
  c = jnp.tanh((r * h) @ w[2] + u[..., 2, :])
  return h + z * (c - h)


@dataclasses.dataclass(frozen=True)
class CellKind:
  """A cell type: its step, Jacobian structure and state layout."""
  step: Any
  structure: str
  planes: int  # 0: state [.., C]; 2: state [.., 2, C] (output = plane 1)


CELLS = {
    "paragru": CellKind(paragru_step, "diagonal", 0),
    "paralstm": CellKind(paralstm_step, "block2", 2),
    "gru": CellKind(gru_step, "dense", 0),
}


def cell_kind(name: str) -> CellKind:
  """The `CellKind` of a cell string; a clear error for unknown ones."""
  return scan.pick(CELLS, name, "cell")


def _check_mode(mode: str) -> str:
  return scan.pick({m: m for m in MODES}, mode, "mode")


def _solver_info(t_steps: int, dtype) -> newton.NewtonInfo:
  """The info a sequential run reports: exact by construction."""
  del t_steps
  return newton.NewtonInfo(jnp.int32(0), jnp.zeros((), dtype),
                           jnp.ones((), bool))


class Cell(nnx.Module):
  """One recurrent layer: input projection D -> 3H, then the recurrence.

  Attributes:
    kind: the `CellKind` (from the cell string).
    mode: 'sequential' | 'parallel'.
    newton: `NewtonConfig` of the parallel mode (structure set from kind).
  """

  def __init__(self, cell: str, d_in: int, hidden: int, *, rngs: nnx.Rngs,
               mode: str = "parallel",
               newton_config: newton.NewtonConfig | None = None,
               param_dtype=jnp.float32, recurrent_scale: float = 1.0):
    self.kind = cell_kind(cell)
    self.name = cell
    self.mode = _check_mode(mode)
    cfg = newton_config or newton.NewtonConfig()
    self.newton = dataclasses.replace(cfg, structure=self.kind.structure)
    self.hidden = hidden
    self.proj = nnx.Linear(d_in, 3 * hidden, rngs=rngs,
                           param_dtype=param_dtype)
    # Gate biases spread over channels (ParaRNN's "bias minus linspace"):
    # the update / forget gates get a range of time scales.
    bias = np.zeros((3, hidden))
    bias[0] = -np.linspace(0.0, 3.0, hidden) * (1 if cell != "paralstm"
                                                else -1)
    self.proj.bias[...] = jnp.asarray(bias.reshape(-1), param_dtype)
    key = rngs.params()
    rec = {}
    if cell == "gru":
      u = jax.random.normal(key, (3, hidden, hidden), param_dtype)
      rec["u"] = nnx.Param(u * recurrent_scale / np.sqrt(hidden))
    else:
      k1, k2 = jax.random.split(key)
      a = jax.random.uniform(k1, (3, hidden), param_dtype, -1.0, 1.0)
      rec["a"] = nnx.Param(a * recurrent_scale)
      if cell == "paralstm":
        p = jax.random.uniform(k2, (2, hidden), param_dtype, -0.5, 0.5)
        rec["p"] = nnx.Param(p * recurrent_scale)
    self.rec = nnx.data(rec)

  def params(self) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in self.rec.items()}

  def init_state(self, batch: int, dtype=jnp.float32) -> jax.Array:
    """Zeros: [B, C], or [B, 2, C] for 'paralstm'."""
    planes = (self.kind.planes,) if self.kind.planes else ()
    return jnp.zeros((batch,) + planes + (self.hidden,), dtype)

  def output(self, state: jax.Array) -> jax.Array:
    """The features a state exposes: h ([.., C])."""
    return state[..., 1, :] if self.kind.planes else state

  def project(self, x: jax.Array) -> jax.Array:
    """u = W x + bias: [..., D] -> [..., 3, C]."""
    u = self.proj(x)
    return u.reshape(u.shape[:-1] + (3, self.hidden))

  def __call__(self, x: jax.Array, h0: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, newton.NewtonInfo]:
    """x [T, B, D] -> (features [T, B, C], last state, solver info)."""
    u = self.project(x)
    if h0 is None:
      h0 = self.init_state(x.shape[1], u.dtype)
    if self.mode == "sequential":
      states = newton.rollout(self.kind.step, self.params(), u, h0)
      info = _solver_info(x.shape[0], u.dtype)
    else:
      states, info = newton.solve(self.kind.step, self.params(), u, h0,
                                  self.newton)
    return self.output(states), states[-1], info

  def step(self, x: jax.Array, state: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    """One decode step: x [B, D], state -> (features [B, C], new state)."""
    state = self.kind.step(self.params(), state, self.project(x))
    return self.output(state), state


# --- language model -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RNNLMConfig:
  """An RNN language model (hashable).

  Attributes:
    vocab_size: V (256 for bytes).
    dim: D, also the cell width C.
    num_layers: L.
    cell: 'paragru' | 'paralstm' | 'gru'.
    mode: 'sequential' | 'parallel'.
    mlp_ratio: MLP width / D.
    impl, chunk, tol, max_iter, damping: the Newton solver (parallel mode).
    param_dtype: 'float32' | 'float64'.
  """
  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  cell: str = "paragru"
  mode: str = "parallel"
  mlp_ratio: int = 2
  impl: str = "auto"
  chunk: int = 64
  tol: float = 1e-6
  max_iter: int = 16
  damping: float = 0.0
  param_dtype: str = "float32"

  def __post_init__(self):
    cell_kind(self.cell)
    _check_mode(self.mode)
    self.newton_config()  # validates impl / chunk / tol

  def newton_config(self) -> newton.NewtonConfig:
    return newton.NewtonConfig(structure=cell_kind(self.cell).structure,
                               impl=self.impl, chunk=self.chunk, tol=self.tol,
                               max_iter=self.max_iter, damping=self.damping)


class Block(nnx.Module):
  """x + out(cell(norm(x))), then x + mlp(norm(x)). Time-major [T, B, D]."""

  def __init__(self, cfg: RNNLMConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.param_dtype)
    self.norm1 = nnx.RMSNorm(cfg.dim, rngs=rngs, param_dtype=dt)
    self.cell = Cell(cfg.cell, cfg.dim, cfg.dim, rngs=rngs, mode=cfg.mode,
                     newton_config=cfg.newton_config(), param_dtype=dt)
    self.out = nnx.Linear(cfg.dim, cfg.dim, rngs=rngs, param_dtype=dt)
    self.norm2 = nnx.RMSNorm(cfg.dim, rngs=rngs, param_dtype=dt)
    self.up = nnx.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, rngs=rngs,
                         param_dtype=dt)
    self.down = nnx.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, rngs=rngs,
                           param_dtype=dt)

  def mlp(self, x):
    return self.down(jax.nn.gelu(self.up(self.norm2(x))))

  def __call__(self, x, state):
    feats, last, info = self.cell(self.norm1(x), state)
    x = x + self.out(feats)
    return x + self.mlp(x), last, info

  def step(self, x, state):
    feats, state = self.cell.step(self.norm1(x), state)
    x = x + self.out(feats)
    return x + self.mlp(x), state


class RNNState(NamedTuple):
  """Decode state: one cell state per layer ([B, C] or [B, 2, C])."""
  cells: tuple[jax.Array, ...]


class RNNLM(nnx.Module):
  """Embedding -> L blocks -> RMSNorm -> LM head.

  `__call__(tokens [B, T], state) -> (logits [B, T, V], state, infos)` runs
  the whole sequence (sequential or parallel per `cfg.mode`);
  `decode_step(tokens [B], state) -> (logits [B, V], state)` advances one
  token. Both start from and return an explicit `RNNState`.
  """

  def __init__(self, cfg: RNNLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs,
                           param_dtype=dt)
    self.blocks = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = nnx.RMSNorm(cfg.dim, rngs=rngs, param_dtype=dt)
    self.head = nnx.Linear(cfg.dim, cfg.vocab_size, rngs=rngs, param_dtype=dt)

  def init_state(self, batch: int) -> RNNState:
    """Zero states in the parameters' dtype."""
    dt = self.embed.embedding.dtype
    return RNNState(tuple(b.cell.init_state(batch, dt) for b in self.blocks))

  def __call__(self, tokens: jax.Array, state: RNNState | None = None):
    if state is None:
      state = self.init_state(tokens.shape[0])
    x = self.embed(tokens.T)                          # [T, B, D]
    lasts, infos = [], []
    for block, h0 in zip(self.blocks, state.cells):
      x, last, info = block(x, h0)
      lasts.append(last)
      infos.append(info)
    logits = self.head(self.norm(x))                  # [T, B, V]
    return jnp.swapaxes(logits, 0, 1), RNNState(tuple(lasts)), infos

  def decode_step(self, tokens: jax.Array, state: RNNState):
    x = self.embed(tokens)                            # [B, D]
    new = []
    for block, s in zip(self.blocks, state.cells):
      x, s = block.step(x, s)
      new.append(s)
    return self.head(self.norm(x)), RNNState(tuple(new))


def with_mode(model: nnx.Module, mode: str) -> None:
  """Switches every cell of `model` to `mode` in place."""
  _check_mode(mode)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Cell):
      node.mode = mode
