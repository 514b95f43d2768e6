"""Training a language model (the ParaRNN LM, or a Mamba-2 / hybrid LM):
loss, jitted steps, eval, checkpoints, loop.

The config's `model.family` picks the network: 'rnn' (default,
`seqdec.models.rnn.RNNLM`) or 'hybrid' (`seqdec.models.hybrid.HybridLM`:
Mamba-2 and attention layers by `model.layer_types`, a comma-separated
string; trained through its parallel forms, the chunked SSD and causal
attention).

Pure functions over explicit pytrees (`jax.jit` over `nnx.split` state, not
`nnx.jit`): parameters are a pure dict, the optimiser is optax. The loss is
the mean next-byte cross entropy

    L = -(1 / (B T)) sum_{b,t} log softmax(logits[b, t])[tokens[b, t + 1]]

(nats per byte; perplexity exp(L), bits per byte L / ln 2). Checkpoints are
orbax (`params`, `opt_state`, step) in `workdir/checkpoints`; a rerun with the
same workdir resumes from the latest one, and since the batch of step s is a
function of (seed, s) only, an interrupted run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from seqdec.data import stdlib_corpus
from seqdec.models import hybrid, rnn
from seqdec.train import loop as loop_lib
from seqdec.train.loop import TrainError, TrainState


FAMILIES = ("rnn", "hybrid")


def model_config(c: ml_collections.ConfigDict):
  """`RNNLMConfig` or `HybridConfig` from the `model` section of a config
  (by `family`; clear errors)."""
  kwargs = c.to_dict()
  family = kwargs.pop("family", "rnn")
  if family not in FAMILIES:
    raise TrainError(f"unknown model family {family!r}; expected one of "
                     f"{FAMILIES}")
  try:
    if family == "hybrid":
      kwargs["layer_types"] = tuple(
          x.strip() for x in str(kwargs.get("layer_types", "")).split(","))
      kwargs["num_layers"] = len(kwargs["layer_types"])
      return hybrid.HybridConfig(**kwargs)
    return rnn.RNNLMConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise TrainError(f"bad model config: {e}") from None


def build(cfg, seed: int):
  """(graphdef, params: Param state, rest: other state) of a fresh LM.

  Weights are always drawn in float32 and then cast to `cfg.param_dtype`, so
  a float64 run starts from the same weights as a float32 one.
  """
  if isinstance(cfg, hybrid.HybridConfig):
    module = hybrid.HybridLM(cfg.replace(param_dtype="float32"),
                             rngs=nnx.Rngs(seed))
  else:
    module = rnn.RNNLM(dataclasses.replace(cfg, param_dtype="float32"),
                       rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  dtype = jnp.dtype(cfg.param_dtype)
  return graphdef, jax.tree.map(lambda x: x.astype(dtype), params), rest


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean -log p(target): logits [B, T, V], targets [B, T] -> []."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype,
                                                            jnp.float32)))
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def solver_stats(infos) -> dict[str, jax.Array]:
  """Worst layer: Newton iterations, residual, and non-converged layers."""
  return {"newton_iters": jnp.max(jnp.stack([i.iterations for i in infos])),
          "newton_residual": jnp.max(jnp.stack([i.residual for i in infos])),
          "newton_failed": jnp.sum(jnp.stack([~i.converged for i in infos]))}


def loss_fn(params, graphdef, rest, tokens):
  """(loss, solver stats) of a [B, T + 1] token batch (no stats for a
  hybrid LM: its scans are exact, there is no solver)."""
  model = nnx.merge(graphdef, params, rest)
  inputs = tokens[:, :-1]
  if isinstance(model, hybrid.HybridLM):
    b, t = inputs.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = model(inputs, pos, model.init_cache(b, t))
    return cross_entropy(logits, tokens[:, 1:]), {}
  logits, _, infos = model(inputs)
  return cross_entropy(logits, tokens[:, 1:]), solver_stats(infos)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, global-norm clipping.

  Cached per hyperparameters: the same object (so the same jit cache entry)
  for the same settings.
  """
  return _optimizer(c.learning_rate, c.warmup_steps, c.steps, c.grad_clip,
                    c.weight_decay)


@functools.lru_cache(maxsize=None)
def _optimizer(lr, warmup, steps, clip, weight_decay):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, warmup), max(steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, tx, params, opt_state, rest, tokens):
  """One optimiser step; returns (params, opt_state, metrics)."""
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, graphdef, rest, tokens)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, dict(stats, loss=loss,
                                 grad_norm=optax.tree.norm(grads))


@functools.partial(jax.jit, static_argnums=0)
def eval_step(graphdef, params, rest, tokens):
  return loss_fn(params, graphdef, rest, tokens)


def evaluate(graphdef, params, rest, batches: np.ndarray,
             layout: loop_lib.Layout = loop_lib.Layout()) -> dict[str, float]:
  """Mean validation loss over fixed batches; perplexity and bits per byte."""
  losses = [float(eval_step(graphdef, params, rest, layout.replicate(b))[0])
            for b in batches]
  loss = float(np.mean(losses))
  return {"valid_loss": loss, "valid_ppl": math.exp(loss),
          "valid_bpb": loss / math.log(2)}


class Checkpointer:
  """Orbax checkpoints of (params, opt_state) under `workdir/checkpoints`.

  The pytree is saved as its flat list of leaves (keys "00000", ...) and
  restored into the structure of a freshly built state, so any pytree types
  (NNX state, optax tuples) round-trip; a structure or shape mismatch is an
  error that names the checkpoint.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  @staticmethod
  def _flat(state: TrainState) -> dict[str, Any]:
    leaves = jax.tree.leaves((state.params, state.opt_state))
    return {f"{i:05d}": x for i, x in enumerate(leaves)}

  def save(self, state: TrainState) -> None:
    self.manager.save(state.step, args=self._ocp.args.StandardSave(
        self._flat(state)))
    self.manager.wait_until_finished()

  def restore(self, like: TrainState) -> TrainState:
    step = self.manager.latest_step()
    # Restored onto the layout of `like` (a mesh's shardings included),
    # whatever layout the checkpoint was saved from.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          self._flat(like))
    try:
      flat = self.manager.restore(step, args=self._ocp.args.StandardRestore(
          target))
      treedef = jax.tree.structure((like.params, like.opt_state))
      params, opt_state = jax.tree.unflatten(
          treedef, [flat[k] for k in sorted(flat)])
    except Exception as e:  # pylint: disable=broad-except
      raise TrainError(f"cannot restore checkpoint step {step} "
                       f"({type(e).__name__}); it does not match this "
                       f"config") from None
    return TrainState(step, params, opt_state)

  def close(self) -> None:
    self.manager.close()


def train(config: ml_collections.ConfigDict, workdir: str,
          progress: Callable[[Iterable[int], int, int], Iterable[int]]
          | None = None, log: Callable[[dict], None] | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes) per `config`; returns the history and final eval.

  Args:
    config: see configs/pararnn_lm.py (sections model, data, train).
    workdir: checkpoints and metrics go here; an existing checkpoint resumes.
    progress: wraps the step range (e.g. tqdm); gets (range, start, total).
    log: called with each logged metrics dict.

  Returns:
    {"history": [{"step", "loss", ...}], "eval": {...}, "resumed_from": int}.
  """
  cfg = model_config(config.model)
  if jnp.dtype(cfg.param_dtype) == jnp.float64 and not jax.config.x64_enabled:
    raise TrainError("param_dtype float64 needs jax_enable_x64")
  t = config.train
  if t.steps < 1 or config.data.seq_len < 1 or config.data.batch_size < 1:
    raise TrainError("steps, seq_len and batch_size must be >= 1")
  try:
    corpus = stdlib_corpus.Corpus.load(config.data.max_files,
                                       config.data.valid_fraction)
  except (ValueError, OSError) as e:
    raise TrainError(f"corpus: {e}") from None
  layout = loop_lib.Layout.from_config(config)
  graphdef, params, rest = build(cfg, config.seed)
  params, rest = layout.place(params), layout.place(rest)
  tx = make_optimizer(t)
  state = TrainState(0, params, layout.place(tx.init(params)))
  ckpt = Checkpointer(workdir) if t.checkpoint_every > 0 else None
  try:
    state, history, resumed_from = _loop(config, corpus, graphdef, rest, tx,
                                         state, ckpt, progress, log, layout)
  finally:
    if ckpt is not None:
      ckpt.close()
  valid = corpus.valid_batches(t.eval_batches, config.data.batch_size,
                               config.data.seq_len)
  final = evaluate(graphdef, state.params, rest, valid, layout)
  if log is not None:
    log({"step": state.step, **final})
  return {"history": history, "eval": final, "resumed_from": resumed_from,
          "params": state.params}


def _loop(config, corpus, graphdef, rest, tx, state, ckpt, progress, log,
          layout: loop_lib.Layout):
  """The resumable step loop: (final state, history, resumed-from step)."""
  t, d = config.train, config.data

  def batch(step):
    return layout.batch(corpus.train_batch(
        config.seed, step, d.batch_size, d.seq_len,
        layout.rows(d.batch_size)), d.batch_size)

  def step_fn(params, opt_state, tokens):
    return train_step(graphdef, tx, params, opt_state, rest, tokens)

  return loop_lib.run_steps(state, t.steps, batch, step_fn, ckpt,
                            t.checkpoint_every, t.log_every, progress, log)


def load_trained(config: ml_collections.ConfigDict, workdir: str):
  """The model of `config` with the weights of the latest checkpoint in
  `workdir` (an NNX module: `HybridLM` or `RNNLM`), and its step.

  Raises:
    TrainError: no checkpoint in `workdir`, or one that does not match
      `config`.
  """
  cfg = model_config(config.model)
  graphdef, params, rest = build(cfg, config.seed)
  tx = make_optimizer(config.train)
  ckpt = Checkpointer(workdir)
  try:
    if ckpt.latest_step() is None:
      raise TrainError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    state = ckpt.restore(TrainState(0, params, tx.init(params)))
  finally:
    ckpt.close()
  return nnx.merge(graphdef, state.params, rest), state.step


def export_hf(config: ml_collections.ConfigDict, workdir: str,
              out: str) -> str:
  """Writes the latest checkpoint of a trained Mamba-2 / hybrid LM as an HF
  checkpoint directory `out` (config.json, model.safetensors and the
  byte-level tokenizer), which `seqdec.load_pretrained(out)` and
  transformers' `Mamba2ForCausalLM` / `BambaForCausalLM` load.

  Raises:
    TrainError: not a hybrid-family config, or no usable checkpoint.
    CheckpointError: `out` exists, or the config has no HF architecture.
  """
  from seqdec.checkpoints import hf  # pylint: disable=g-import-not-at-top
  from seqdec.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  if config.model.get("family", "rnn") != "hybrid":
    raise TrainError("only the 'hybrid' family (Mamba-2 / Bamba) exports to "
                     "an HF checkpoint")
  model, _ = load_trained(config, workdir)
  return hf.save_hf(model, out, Tokenizer.byte_level())
