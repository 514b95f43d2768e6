"""Training an EAGLE drafter on a target's cached features.

Data: a `seqdec.data.features` dataset (the target's responses and its
features f_t). For a sequence x_0..x_{n-1} with features f_t, the network
reads the pairs (e(x_t), f_{t-1}), t = 1 .. n-1, causally (`EagleNet`), and
at each trained position t predicts f^_t. The loss (EAGLE's) is

    L = w_reg * SmoothL1(f^_t - f_t)            mean over the D features
      + w_ce  * CE(p_t, q_t),   p_t = softmax(head(f_t)),
                                q_t = softmax(head(f^_t))

averaged over K positions per row drawn (seeded by the step) among the
trained ones; with a trimmed head (`data.vocab_keep` = M > 0: the M tokens
most frequent in the training responses, `top_tokens`) both p and q are over
the kept ids only, renormalised there, which is the law the trimmed drafter
drafts from (`drafters.eagle`) and costs M / V of the head: the response (t >= prompt_len - 1) of each sequence, or every
position with `train.positions = 'all'`. The head is the target's frozen LM
head, applied to the cached features for p (distillation targets are never
stored). Only the network's weights train; the target's embedding and head
are inputs. As in EAGLE, the input features get uniform noise
U(-a, a) (`train.feature_noise`; the targets stay clean), which makes the
drafter robust to the errors of the features it predicts for itself.
With `train.ttt_steps` = K > 1 (EAGLE-3's training-time test,
`forward_steps`), K - 1 more passes feed the network its own predictions
as at tree depths 2..K, and the loss sums the passes' terms.

Batches: step s reads rows perm_e[i] for the batch's slots i, where perm_e
is a permutation of the training rows drawn from (seed, epoch e), and slot
i's positions and noise from (seed, s, i); a function of (seed, s) only, so
a resumed run repeats and skips nothing, and on a mesh each process reads
and draws only its own slots (`seqdec.train.loop.Layout`). The last
`data.valid_rows` finished rows are the validation split.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from seqdec.checkpoints import drafters as drafter_ckpt
from seqdec.checkpoints.fingerprint import fingerprint
from seqdec.data.features import ConcatDataset, DataError, FeatureDataset
from seqdec.decoding.loops import bucket
from seqdec.models import eagle
from seqdec.models import hydra
from seqdec.models import medusa
from seqdec.models import redrafter
from seqdec.train import loop as loop_lib
from seqdec.train.lm import Checkpointer, make_optimizer
from seqdec.train.loop import TrainError, TrainState


def smooth_l1(x: jax.Array) -> jax.Array:
  """Huber with threshold 1: 0.5 x^2 if |x| < 1 else |x| - 0.5."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def forward(net, target, tokens: jax.Array, features: jax.Array
            ) -> jax.Array:
  """Teacher-forced `[B, S-1, D]` f^_t for t = 1 .. S-1 (module docstring)."""
  return forward_steps(net, target, tokens, features, 1)[0]


def ttt_mask(t: int, k: int) -> jax.Array:
  """`[T, k*T]` visibility of pass k of `forward_steps` over the K/V of
  passes 1..k (pass m's T slots at columns (m-1)T .. mT-1).

  Index i of pass k stands for the k-th level of a chain drafted after
  committed index i-k+1, so it sees what that node sees when drafting:

      pass 1 slot j   iff  j <= i - k + 1          (committed, true f)
      pass m slot j   iff  j == i - k + m,  2 <= m <= k
                                                   (its drafted ancestors
                                                    and itself)
  """
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  blocks = [j <= i - k + 1] + [j == i - k + m for m in range(2, k + 1)]
  return jnp.concatenate(blocks, axis=1)


def forward_steps(net, target, tokens: jax.Array, features: jax.Array,
                  steps: int) -> list[jax.Array]:
  """EAGLE-3's training-time test: `steps` teacher-forced passes, pass k's
  `[B, S-1, D]` predictions f^(k) at each index i as the drafter makes them
  at tree depth k, from its own earlier predictions:

      pass 1:  u_i = [e(x_{i+1}) ; f_i]               (the cached features;
                                                       EAGLE-3: fused F_i)
      pass k:  u_i = [e(x_{i+1}) ; f^(k-1)_{i-1}]     (its own, k >= 2)

  attending as `ttt_mask` (committed true-feature entries, then the chain's
  own). Tokens are the true ones (teacher forcing). f^(k-1) enters pass k
  without a gradient. Index i < k-1 has no chain (its loss weight is 0).
  """
  b, s = tokens.shape
  t = s - 1
  pos = jnp.broadcast_to(jnp.arange(1, s, dtype=jnp.int32), (b, t))
  emb = target.embed_tokens(tokens[:, 1:])
  cache = net.init_cache(b, steps * t)
  inputs, preds = features[:, :-1], []
  for k in range(1, steps + 1):
    mask = jnp.broadcast_to(ttt_mask(t, k), (b, t, k * t))
    pred, cache = net(emb, inputs, pos, cache, mask)
    preds.append(pred)
    inputs = jnp.concatenate(
        [net.lift(features[:, :1]).astype(features.dtype),
         jax.lax.stop_gradient(pred[:, :-1]).astype(features.dtype)], axis=1)
  return preds


def loss_fn(net_params, net_def, target_params, target_def, batch,
            w_reg: float, w_ce: float, keep_ids=None, ttt: int = 1):
  """(loss, metrics) of the drafter `net_def` describes (`eagle_loss` or
  `medusa_loss`) at `batch['index']` [B, K] with weights `batch['weight']`.

  `net_params` = (trained `nnx.Param` state, the rest: RoPE frequencies)."""
  net = nnx.merge(net_def, *net_params)
  target = nnx.merge(target_def, target_params)
  if isinstance(net, medusa.MedusaHeads):
    return medusa_loss(net, target, batch, w_ce, keep_ids)
  if isinstance(net, (hydra.HydraHeads, redrafter.ReDrafterHead)):
    return medusa_loss(net, target, batch, w_ce, keep_ids,
                       sequential=True)
  return eagle_loss(net, target, batch, w_reg, w_ce, keep_ids, ttt)


def final_features(features: jax.Array, target) -> jax.Array:
  """The LM head's input f from stored features: the last D of EAGLE-3's
  fused `[..., (k+1)D]` (`protocol.backbone_features`), or all of them."""
  return features[..., -target.config.hidden_size:]


def net_inputs(features: jax.Array, net, target) -> jax.Array:
  """What `net` reads of stored features: all of them for an EAGLE-3
  network (its taps are the dataset's, `check_dataset_taps`), the final
  ones otherwise (so a fused dataset trains EAGLE-1 too)."""
  return features if getattr(net, "taps", ()) else final_features(
      features, target)


def loss_dtype(target) -> jnp.dtype:
  """The losses are computed in float32, or float64 for a float64 target
  (the features are stored in bfloat16 either way)."""
  return jnp.promote_types(target.config.dtype, jnp.float32)


def _weighted_mean(w: jax.Array):
  denom = jnp.maximum(w.sum(), 1.0)
  return lambda x: (x * w).sum() / denom


def _target_logp(f: jax.Array, target, keep_ids) -> jax.Array:
  """log p = log softmax(head(f)), over the kept ids when trimmed."""
  return jax.nn.log_softmax(target.head(f, keep_ids), -1)


def _distill(logp: jax.Array, f_hat_logits: jax.Array):
  """`(CE(p, q), top-1 agreement)` with p = exp(`logp`) (`_target_logp`)
  and q = softmax(f_hat_logits)."""
  logq = jax.nn.log_softmax(f_hat_logits, -1)
  ce = -(jnp.exp(logp) * logq).sum(-1)
  agree = (jnp.argmax(logq, -1) == jnp.argmax(logp, -1)).astype(jnp.float32)
  return ce, agree


def medusa_loss(heads, target, batch, w_ce: float, keep_ids=None,
                decay: float = 0.8, sequential: bool = False):
  """Medusa's loss at sampled feature positions t (= index + 1):

      L = w_ce * sum_k decay^(k-1) CE(p_{t+k}, q_k(. | f_t)),
      p_{t+k} = softmax(head(f_{t+k}))    (the target's law of x_{t+k+1})

  each head's term averaged over the positions with t + k < length. With
  `sequential` (Hydra, ReDrafter), head k also reads e(x_{t+1}) .. e(x_{t+k}), the
  true tokens (teacher forcing); Hydra++ heads read their prefix layer's
  g_t over f_0..f_t (causal) too. Metrics: per-head CE and top-1
  agreement (ce1.., top1_1..)."""
  feats = final_features(batch["features"], target).astype(
      loss_dtype(target))
  t = batch["index"] + 1                                        # [B, P]
  w = batch["weight"]
  n = batch["lengths"][:, None]
  b, s = feats.shape[:2]
  f_t = jnp.take_along_axis(feats, t[..., None], axis=1)        # [B, P, D]
  g_t = None
  if getattr(heads, "layers", None) is not None:   # Hydra++'s prefix layer
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    g, _ = heads.context(feats, pos, heads.init_cache(b, s))
    g_t = jnp.take_along_axis(g, t[..., None], axis=1)
  if sequential:
    steps = jnp.minimum(t[..., None] + jnp.arange(
        1, heads.config.num_heads + 1), s - 1)                  # [B, P, K]
    emb = target.embed_tokens(jnp.take_along_axis(
        batch["tokens"], steps.reshape(steps.shape[0], -1), 1))
    emb = emb.reshape(steps.shape + (-1,))                      # [B,P,K,D]
  else:
    logits = heads.logits(f_t, target, keep_ids)                # [B,P,K,V]
  loss, stats = 0.0, {}
  for k in range(1, heads.config.num_heads + 1):
    tk = jnp.minimum(t + k, s - 1)
    f_tk = jnp.take_along_axis(feats, tk[..., None], axis=1)
    logits_k = (target.head(heads.features(
        k, f_t, emb[:, :, :k], *(() if g_t is None else (g_t,))), keep_ids)
                if sequential else logits[:, :, k - 1])
    ce, agree = _distill(_target_logp(f_tk, target, keep_ids), logits_k)
    mean = _weighted_mean(w * (t + k < n))
    loss = loss + w_ce * decay ** (k - 1) * mean(ce)
    stats[f"ce{k}"], stats[f"top1_{k}"] = mean(ce), mean(agree)
  return loss, dict(stats, top1=stats["top1_1"])


def eagle_loss(net, target, batch, w_reg: float, w_ce: float, keep_ids=None,
               ttt: int = 1):
  """EAGLE's loss of the module docstring; with `ttt` > 1 summed over the
  passes of `forward_steps` (each pass k at the positions with a chain of
  k levels), metrics `top1_k` per pass."""
  feats = batch["features"].astype(loss_dtype(target))
  # EAGLE's input noise: the drafter reads f + U(-a, a) (robustness to its
  # own feature errors when it drafts from predicted features); targets are
  # the clean features.
  noisy = feats + batch["noise"] if "noise" in batch else feats
  preds = forward_steps(net, target, batch["tokens"],
                        net_inputs(noisy, net, target), ttt)
  idx = batch["index"]                                         # [B, K]
  at = lambda x: jnp.take_along_axis(x, idx[..., None], axis=1)  # noqa: E731
  f = at(final_features(feats, target)[:, 1:])                 # [B, K, D]
  logp = _target_logp(f, target, keep_ids)        # the same for every pass
  loss, stats = 0.0, {}
  for k, pred in enumerate(preds, start=1):
    p_hat = at(pred).astype(feats.dtype)                       # [B, K, D]
    reg = smooth_l1(p_hat - f).mean(-1)
    ce, agree = _distill(logp, target.head(p_hat, keep_ids))
    mean = _weighted_mean(batch["weight"] * (idx >= k - 1))
    loss = loss + w_reg * mean(reg) + w_ce * mean(ce)
    if k == 1:
      stats.update(reg=mean(reg), ce=mean(ce), top1=mean(agree))
    else:
      stats[f"top1_{k}"] = mean(agree)
  return loss, stats


def chain_trace(net, target, batch, depth: int, keep_ids=None
                ) -> tuple[jax.Array, jax.Array]:
  """`(a [B, K], log q [B, K, depth])` of the greedy chains that start at
  the batch's positions i (root x_{i+1}), each drafted `depth` levels deep
  by the network from its own features (`forward_steps`) and verified
  against the target's greedy token:

      a(i) = sum_{m=1..depth} prod_{l<=m} [argmax q_l = argmax p_l]
      log q(i)[m] = sum_{l<=m} max_v log q_l(v)

  with q_l the drafter's law at depth l (over the kept ids when trimmed:
  the token it drafts), p_l = softmax(head(f)) the target's over the whole
  vocabulary at that position. log q(i)[m] is the path log-probability the
  drafter gives its depth-m node at T = 0 (`Tree.path_logq`, which the
  round gate reads). The chain's next token is the data's; a chain stops
  where the data's token is not the target's greedy one (a sampled or
  bf16-written response), or at the row's end.
  """
  feats = batch["features"].astype(loss_dtype(target))
  preds = forward_steps(net, target, batch["tokens"],
                        net_inputs(feats, net, target), depth)
  idx = batch["index"]                                         # [B, K]
  n = batch["lengths"][:, None]
  s = feats.shape[1]
  live = jnp.ones(idx.shape, jnp.int32)
  acc = jnp.zeros(idx.shape, jnp.int32)
  path_logq, logqs = jnp.zeros(idx.shape, feats.dtype), []
  for m, pred in enumerate(preds, start=1):
    j = idx + m - 1                           # pass-m index: predicts f_{j+1}
    jj = jnp.minimum(j, s - 2)
    at = lambda x, jj=jj: jnp.take_along_axis(  # noqa: E731
        x, jj[..., None], axis=1)
    logq = jax.nn.log_softmax(
        target.head(at(pred).astype(feats.dtype), keep_ids), -1)
    drafted = jnp.argmax(logq, -1)
    path_logq = path_logq + jnp.max(logq, -1)
    logqs.append(path_logq)
    if keep_ids is not None:
      drafted = keep_ids[drafted]
    greedy = jnp.argmax(target.head(at(final_features(feats, target)[:, 1:])),
                        -1)
    ok = (drafted == greedy) & (j + 1 <= n - 1)
    live = live * ok
    acc = acc + live
    nxt = jnp.take_along_axis(batch["tokens"], jnp.minimum(j + 2, s - 1), 1)
    live = live * ((nxt == greedy) & (j + 2 <= n - 1))
  return acc, jnp.stack(logqs, -1)


def chain_accepts(net, target, batch, depth: int, keep_ids=None
                  ) -> jax.Array:
  """`[B, K]` accepted drafts a(i) of the greedy chains that start at the
  batch's positions i (`chain_trace`)."""
  return chain_trace(net, target, batch, depth, keep_ids)[0]


def chain_tau(net, target, batch, depth: int, keep_ids=None
              ) -> tuple[jax.Array, jax.Array]:
  """Position-averaged greedy chain τ on a batch: `(sum of w * τ(i), sum
  of w)` with τ(i) = 1 + a(i) (`chain_accepts`) over the chains that start
  at every weighted position i.

  This weights every position alike, which is *not* what a decoding loop
  sees: its rounds start where the previous one stopped, more often in the
  hard stretches (an easy run of 10 tokens costs two rounds, a hard one
  ten), so the loop's τ is lower (`loop_tau`)."""
  tau = 1 + chain_accepts(net, target, batch, depth, keep_ids)
  w = batch["weight"]
  return (w * tau).sum(), w.sum()


def loop_tau(accepts: np.ndarray, index: np.ndarray, weight: np.ndarray,
             prompt_lens: np.ndarray, lengths: np.ndarray
             ) -> tuple[int, int]:
  """`(tokens, rounds)` of greedy chain speculative decoding replayed on
  each row's response, from the chains' accepted drafts a(i)
  (`chain_accepts` at every response position: `index` [B, K] with
  `weight` 1 where present): the first round's root is the first response
  token x_P (index i = P - 1), a round at i emits

      e(i) = min(a(i) + 1, n - 2 - i)       (a(i) drafts and the bonus,
                                             cut at the row's end)

  and the next round starts at i + e(i), until the row's n tokens are
  emitted. tokens / rounds is the τ a decoding loop measures on this text
  (exactly, at T = 0 on the target's own greedy text); the first response
  token, from the prefill, is in neither count.
  """
  tokens = rounds = 0
  for r in range(len(lengths)):
    n, p = int(lengths[r]), int(prompt_lens[r])
    by_index = {int(i): int(a) for i, a, w in zip(index[r], accepts[r],
                                                   weight[r]) if w > 0}
    i = p - 1
    while i <= n - 3:
      if i not in by_index:
        raise ValueError(f"row {r}: no chain at index {i} (loop_tau needs "
                         f"every response position)")
      e = min(by_index[i] + 1, n - 2 - i)
      tokens, rounds, i = tokens + e, rounds + 1, i + e
  return tokens, rounds


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def chain_accepts_step(net_def, target_def, depth, params, target_params,
                       batch, rest=None, keep_ids=None):
  return chain_accepts(nnx.merge(net_def, params, rest),
                       nnx.merge(target_def, target_params), batch, depth,
                       keep_ids)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4),
                   static_argnames=("ttt",), donate_argnums=(5, 6))
def train_step(net_def, target_def, tx, w_reg, w_ce, params, opt_state,
               target_params, batch, rest=None, keep_ids=None, ttt=1):
  """One AdamW step on the network's `nnx.Param`s (`params`); `rest` (its
  other variables), the target's parameters and the kept ids are inputs."""
  (loss, stats), grads = jax.value_and_grad(
      lambda p: loss_fn((p, rest), net_def, target_params, target_def, batch,
                        w_reg, w_ce, keep_ids, ttt), has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, dict(stats, loss=loss,
                                 grad_norm=optax.tree.norm(grads))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3),
                   static_argnames=("ttt",))
def eval_step(net_def, target_def, w_reg, w_ce, params, target_params, batch,
              rest=None, keep_ids=None, ttt=1):
  return loss_fn((params, rest), net_def, target_params, target_def, batch,
                 w_reg, w_ce, keep_ids, ttt)


def sample_positions(rngs: Sequence[np.random.Generator],
                     lengths: np.ndarray, prompt_lens: np.ndarray,
                     seq_len: int, k: int, response_only: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`(index [B, K], weight [B, K])`: K trained positions t per row as
  indices t - 1 into f^ (t in [lo, n-1], lo = prompt_len - 1 or 1), drawn
  without replacement with row i's own generator `rngs[i]`; rows with
  fewer than K get weight 0 on the rest."""
  b = len(lengths)
  index = np.zeros((b, k), np.int32)
  weight = np.zeros((b, k), np.float32)
  for i in range(b):
    lo = max(1, int(prompt_lens[i]) - 1) if response_only else 1
    hi = min(int(lengths[i]) - 1, seq_len - 1)      # t <= n - 1
    cand = np.arange(lo, hi + 1)
    take = rngs[i].permutation(cand)[:k] if len(cand) > k else cand
    index[i, :len(take)] = take - 1
    weight[i, :len(take)] = 1.0
  return index, weight


def top_tokens(ds: FeatureDataset, rows: np.ndarray, m: int,
               vocab_size: int) -> np.ndarray:
  """The `m` token ids most frequent in the responses of `rows` (ties: the
  lower id), sorted by id: the trimmed drafter vocabulary."""
  data = ds.read(rows, ("tokens", "lengths", "prompt_lens"))
  counts = np.zeros(vocab_size, np.int64)
  for toks, n, p in zip(data["tokens"], data["lengths"], data["prompt_lens"]):
    np.add.at(counts, toks[p:n], 1)
  order = np.lexsort((np.arange(vocab_size), -counts))
  return np.sort(order[:m]).astype(np.int32)


class Batches:
  """Training and validation batches of a dataset (module docstring)."""

  def __init__(self, ds: FeatureDataset, batch_size: int, positions: int,
               valid_rows: int, seed: int, response_only: bool,
               noise: float = 0.0, length_groups: int = 0):
    if ds.rows <= valid_rows:
      raise DataError(f"dataset {ds.path!r} has {ds.rows} finished rows, "
                      f"need more than data.valid_rows={valid_rows}")
    if length_groups < 0:
      raise DataError(f"data.length_groups must be >= 0, got "
                      f"{length_groups}")
    self.ds, self.b, self.k, self.seed = ds, batch_size, positions, seed
    self.response_only = response_only
    self.noise = noise
    self.train_rows = ds.rows - valid_rows
    self.valid = np.arange(self.train_rows, ds.rows)
    self.length_groups = length_groups
    self.lengths = (ds.read(np.arange(self.train_rows), ("lengths",))[
        "lengths"] if length_groups > 1 else None)

  def rows(self, step: int) -> np.ndarray:
    """The rows of step `step`: slots step*B .. step*B + B - 1 of the
    concatenated per-epoch permutations."""
    n, out = self.train_rows, []
    for slot in range(step * self.b, (step + 1) * self.b):
      epoch, i = divmod(slot, n)
      out.append(self._permutation(epoch)[i])
    return np.asarray(out)

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    """The training rows' order in `epoch` (drawn from (seed, epoch)).

    With `length_groups` = G > 1, rows of like length share a batch (a
    batch is computed at its longest row's width): each window of G * B
    rows of the permutation is sorted by length, and the epoch's whole
    batches are then shuffled (the same generator), so an epoch still
    holds every row once and batches of every length come in random
    order."""
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(self.train_rows)
    if self.lengths is None:
      return perm
    w = self.b * self.length_groups
    perm = np.concatenate([
        win[np.argsort(self.lengths[win], kind="stable")]
        for win in np.split(perm, range(w, len(perm), w))])
    whole = len(perm) // self.b
    order = rng.permutation(whole)
    return np.concatenate([perm[:whole * self.b].reshape(whole, self.b)[
        order].reshape(-1), perm[whole * self.b:]])

  def make(self, rows: np.ndarray, key, noise: float = 0.0,
           local: slice = slice(None), positions: Optional[int] = None
           ) -> dict[str, np.ndarray]:
    """The batch of `rows`, cut to its longest sequence (bucketed: a few
    shapes, each compiled once) so padding is not computed; with `noise`
    > 0, uniform input noise U(-noise, noise) for the features.

    Only the slots `local` of the batch are read and returned (a process's
    share of a sharded batch); slot i's positions and noise are drawn from
    (key, i) alone and the width from every row's length, so the share is
    exactly those slots of the whole batch. `positions` (default the
    configured K) positions per row; at least a row's count gives all of
    them, in order."""
    lengths = self.ds.read(rows, ("lengths",))["lengths"]
    width = min(self.ds.meta["seq_len"], bucket(int(lengths.max())))
    slots = np.arange(len(rows))[local]
    data = self.ds.read(rows[local])
    rngs = [np.random.default_rng(list(key) + [int(i)]) for i in slots]
    index, weight = sample_positions(
        rngs, data["lengths"], data["prompt_lens"], width,
        positions or self.k, self.response_only)
    out = dict(tokens=data["tokens"][:, :width],
               features=data["features"][:, :width],
               lengths=data["lengths"], prompt_lens=data["prompt_lens"],
               index=index, weight=weight)
    if noise > 0:
      out["noise"] = np.stack([
          r.uniform(-noise, noise, out["features"].shape[1:])
          for r in rngs]).astype(np.float32)
    return out

  def train(self, step: int, local: slice = slice(None)
            ) -> dict[str, np.ndarray]:
    """Step `step`'s batch, or its slots `local`."""
    return self.make(self.rows(step), [self.seed, 1, step], self.noise,
                     local)

  def validation(self, every_position: bool = False
                 ) -> list[dict[str, np.ndarray]]:
    """The validation rows' batches: K sampled positions per row, or with
    `every_position` all of them (what `loop_tau` replays)."""
    k = self.ds.meta["seq_len"] if every_position else None
    return [self.make(self.valid[i:i + self.b], [self.seed, 2, i],
                      positions=k)
            for i in range(0, len(self.valid), self.b)]


def evaluate(net_def, target_def, params, rest, target_params, batches,
             w_reg, w_ce, keep_ids=None, ttt: int = 1,
             tau_depth: int = 0, tau_batches=None) -> dict[str, float]:
  """Position-weighted means of the loss terms over validation batches,
  and with `tau_depth` > 0 (an EAGLE network) the greedy chain τ of that
  depth on `tau_batches` (the validation rows at every response position,
  `Batches.validation(every_position=True)`): `valid_tau<depth>`, averaged
  over positions (`chain_tau`), and `valid_loop_tau<depth>`, the tokens
  per round a decoding loop gets on that text (`loop_tau`), which is what
  the benchmark measures."""
  sums, total = {}, 0.0
  for b in batches:
    loss, stats = eval_step(net_def, target_def, w_reg, w_ce, params,
                            target_params, b, rest, keep_ids, ttt=ttt)
    w = float(b["weight"].sum())
    for k, v in dict(stats, loss=loss).items():
      sums[k] = sums.get(k, 0.0) + float(v) * w
    total += w
  out = {f"valid_{k}": v / max(total, 1.0) for k, v in sums.items()}
  if tau_depth:
    if tau_batches is None:
      raise TrainError("evaluate: tau_depth needs tau_batches (every "
                       "response position)")
    tau, loop = [0.0, 0.0], [0, 0]
    for b in tau_batches:
      acc = np.asarray(chain_accepts_step(net_def, target_def, tau_depth,
                                          params, target_params, b, rest,
                                          keep_ids))
      w = np.asarray(b["weight"])
      tau = [tau[0] + float((w * (1 + acc)).sum()), tau[1] + float(w.sum())]
      got = loop_tau(acc, np.asarray(b["index"]), w,
                     np.asarray(b["prompt_lens"]), np.asarray(b["lengths"]))
      loop = [loop[0] + got[0], loop[1] + got[1]]
    out[f"valid_tau{tau_depth}"] = tau[0] / max(tau[1], 1.0)
    out[f"valid_loop_tau{tau_depth}"] = loop[0] / max(loop[1], 1)
  return out


KINDS = ("eagle", "medusa", "hydra", "redrafter")


def build_net(config: ml_collections.ConfigDict, target):
  """A fresh network of `config.drafter.kind` for `target`."""
  kind = config.drafter.kind
  if kind == "eagle":
    return eagle.create(target.config, config.seed, config_taps(config,
                                                                target))
  if kind == "medusa":
    if config.drafter.num_heads < 1:
      raise TrainError(f"drafter.num_heads must be >= 1, got "
                       f"{config.drafter.num_heads}")
    return medusa.create(target, config.drafter.num_heads,
                         config.drafter.own_heads, config.seed)
  if kind == "hydra":
    if config.drafter.num_heads < 1:
      raise TrainError(f"drafter.num_heads must be >= 1, got "
                       f"{config.drafter.num_heads}")
    return hydra.create(target, config.drafter.num_heads, config.seed,
                        bool(config.drafter.get("prefix_attention", False)))
  if kind == "redrafter":
    if config.drafter.num_heads < 1 or config.drafter.num_layers < 0:
      raise TrainError(f"drafter.num_heads (trained depth) must be >= 1 and "
                       f"drafter.num_layers >= 0, got "
                       f"{config.drafter.num_heads}, "
                       f"{config.drafter.num_layers}")
    return redrafter.create(target, config.drafter.num_layers,
                            config.drafter.num_heads, config.seed)
  raise TrainError(f"unknown drafter.kind {kind!r}; known: {KINDS}")


def config_taps(config: ml_collections.ConfigDict, target
                ) -> tuple[int, ...]:
  """`drafter.taps` as block indices (`eagle.parse_taps`: '', 'eagle3' or
  '2,15')."""
  try:
    return eagle.parse_taps(str(config.drafter.get("taps", "") or ""),
                            target.config.num_layers)
  except ValueError as e:
    raise TrainError(f"drafter.taps: {e}") from None


def warm_start(params: nnx.State, path: str, target) -> nnx.State:
  """The parameters of the saved drafter at `path` (`drafters.load`, its
  target fingerprint checked) in place of the fresh `params`: a run that
  continues a trained drafter on new data or for more steps, with a fresh
  optimizer and schedule. Only the network's weights carry over (a trimmed
  head's ids are recomputed from this run's training rows).

  Raises:
    TrainError: the saved network differs from this config's (kind, taps,
      heads or layers), or `drafters.load`'s errors (missing, corrupt, for
      another target).
  """
  saved = nnx.state(drafter_ckpt.load(os.path.expanduser(path), target)[0],
                    nnx.Param)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  have = jax.tree.map(lambda x: (x.shape, x.dtype), saved)
  if jax.tree.structure(want) != jax.tree.structure(have) or (
      jax.tree.leaves(want) != jax.tree.leaves(have)):
    raise TrainError(f"train.init_from: {path!r} holds a drafter of another "
                     f"shape than this config builds (drafter.kind, taps, "
                     f"heads or layers differ)")
  return saved


def check_dataset_taps(ds, net) -> None:
  """DataError unless the dataset's features carry the taps `net` reads (a
  network without taps reads the final features of any dataset)."""
  have = tuple(ds.meta.get("taps", ()))
  want = tuple(getattr(net, "taps", ()))
  if want and have != want:
    raise DataError(f"dataset {ds.path!r} holds features with taps "
                    f"{list(have)}, the drafter reads taps {list(want)}; "
                    f"build the data with --taps={','.join(map(str, want))}")


def open_batches(config: ml_collections.ConfigDict, target) -> Batches:
  """`config`'s dataset for `target` (fingerprint and feature width checked)
  as training and validation `Batches`."""
  t, d = config.train, config.data
  ds = ConcatDataset.open(d.path, fingerprint(target))
  if ds.meta["hidden"] != target.config.hidden_size:
    raise DataError(f"dataset {d.path!r} has features of width "
                    f"{ds.meta['hidden']}, the target {target.config.hidden_size}")
  return Batches(ds, d.batch_size, d.positions, d.valid_rows, config.seed,
                 d.positions_from == "response",
                 float(t.get("feature_noise", 0.0)),
                 int(d.get("length_groups", 0)))


def eval_depths(config: ml_collections.ConfigDict, kind: str
                ) -> tuple[int, int]:
  """`(ttt_steps, tau_depth)` of `config.train` for a drafter of `kind`
  (both apply to EAGLE only: 1 and 0 otherwise)."""
  ttt = int(config.train.get("ttt_steps", 1))
  if ttt < 1 or (ttt > 1 and kind != "eagle"):
    raise TrainError(f"train.ttt_steps must be >= 1 (and 1 unless the "
                     f"drafter is eagle), got {ttt}")
  return ttt, int(config.train.get("tau_depth", 0)) if kind == "eagle" else 0


def validate(config: ml_collections.ConfigDict, target, net,
             keep_ids: Optional[np.ndarray] = None) -> dict[str, float]:
  """The validation metrics of a trained network `net` (e.g. a saved
  drafter, `drafters.load`) on `config`'s dataset and validation split, as
  `train` reports them: drafters trained on other data or with other
  options compared on the same rows."""
  batches = open_batches(config, target)
  check_dataset_taps(batches.ds, net)
  net_def, params, rest = nnx.split(net, nnx.Param, ...)
  target_def, target_params = nnx.split(target)
  ttt, tau_depth = eval_depths(
      config, "eagle" if isinstance(net, eagle.EagleNet) else "heads")
  return evaluate(net_def, target_def, params, rest, target_params,
                  batches.validation(), float(config.train.w_reg),
                  float(config.train.w_ce),
                  None if keep_ids is None else jnp.asarray(keep_ids),
                  ttt, tau_depth,
                  batches.validation(every_position=True) if tau_depth
                  else None)


def train(config: ml_collections.ConfigDict, target, workdir: str,
          progress=None, log: Optional[Callable[[dict], None]] = None
          ) -> dict[str, Any]:
  """Trains (or resumes) an EAGLE network for `target` per `config`
  (configs/drafters/eagle.py). Returns history, final validation metrics
  and the trained `EagleNet` (with its `keep_ids`, or None)."""
  t, d = config.train, config.data
  if t.steps < 1 or d.batch_size < 1 or d.positions < 1:
    raise TrainError("train.steps, data.batch_size and data.positions must "
                     "be >= 1")
  if d.positions_from not in ("response", "all"):
    raise TrainError(f"data.positions_from must be 'response' or 'all', got "
                     f"{d.positions_from!r}")
  batches = open_batches(config, target)
  ds = batches.ds
  layout = loop_lib.Layout.from_config(config)
  net = build_net(config, target)
  check_dataset_taps(ds, net)
  net_def, params, rest = nnx.split(net, nnx.Param, ...)
  if t.get("init_from", ""):
    params = warm_start(params, str(t.init_from), target)
  params, rest = layout.place(params), layout.place(rest)
  target_def, target_params = nnx.split(target)
  target_params = layout.place(target_params)
  keep_ids = None
  if d.vocab_keep:
    if not 0 < d.vocab_keep <= target.config.vocab_size:
      raise TrainError(f"data.vocab_keep must be in [0, "
                       f"{target.config.vocab_size}], got {d.vocab_keep}")
    keep_ids = layout.replicate(top_tokens(
        ds, np.arange(batches.train_rows), d.vocab_keep,
        target.config.vocab_size))
  tx = make_optimizer(t)
  state = TrainState(0, params, layout.place(tx.init(params)))
  ckpt = Checkpointer(workdir) if t.checkpoint_every > 0 else None
  valid = [layout.replicate(b) for b in batches.validation()]
  ttt, tau_depth = eval_depths(config, config.drafter.kind)
  valid_tau = [layout.replicate(b) for b in batches.validation(
      every_position=True)] if tau_depth else None
  local = layout.rows(d.batch_size)

  def batch(step):
    return layout.batch(batches.train(step, local), d.batch_size)
  w_reg, w_ce = float(t.w_reg), float(t.w_ce)

  def step_fn(params, opt_state, batch):
    return train_step(net_def, target_def, tx, w_reg, w_ce, params,
                      opt_state, target_params, batch, rest, keep_ids,
                      ttt=ttt)

  def every(state):
    if t.eval_every > 0 and state.step % t.eval_every == 0:
      return evaluate(net_def, target_def, state.params, rest,
                      target_params, valid, w_reg, w_ce, keep_ids, ttt,
                      tau_depth, valid_tau)
    return None

  try:
    state, history, resumed_from = loop_lib.run_steps(
        state, t.steps, batch, step_fn, ckpt, t.checkpoint_every,
        t.log_every, progress, log, every)
  finally:
    if ckpt is not None:
      ckpt.close()
  final = evaluate(net_def, target_def, state.params, rest, target_params,
                   valid, w_reg, w_ce, keep_ids, ttt, tau_depth, valid_tau)
  if log is not None and not (history and history[-1] == {
      "step": state.step, **final}):
    log({"step": state.step, **final})
  return dict(history=history, eval=final, resumed_from=resumed_from,
              net=nnx.merge(net_def, state.params, rest),
              keep_ids=None if keep_ids is None else np.asarray(keep_ids),
              train_rows=batches.train_rows, valid_rows=len(batches.valid))
