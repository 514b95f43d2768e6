"""The EAGLE drafter: trained on a tiny target's own continuations, it is
lossless through the engine, its loss falls, its checkpoints round-trip and
bad checkpoints or datasets are refused by name."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec import testing
from seqdec.bench import first_divergence
from seqdec.checkpoints import drafters as drafter_ckpt
from seqdec.data import features as feature_data
from seqdec.decoding import drafters as drafters_lib
from seqdec.generator import Generator
from seqdec.models import eagle
from seqdec.tokenizer import Tokenizer
from seqdec.train import drafter as trainer
from seqdec.train.lm import make_optimizer

import ml_collections

STEPS = 150


def continuations(model, n=24, prompt=6, new=26, seed=0):
  """`[n, prompt + new]` random prompts continued greedily by the model."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, model.config.vocab_size, (n, prompt)).tolist()
  out = Generator(model, Tokenizer.byte_level(), max_new_tokens=new,
                  eos_ids=(), max_batch=n).generate_ids(prompts)
  return np.asarray([p + r.tokens for p, r in zip(prompts, out)], np.int32)


def full_batch(target, tokens, taps=()):
  """A training batch of `tokens` [n, s] with the target's features (fused
  with `taps`), every position trained (weight 1)."""
  n, s = tokens.shape
  return dict(tokens=tokens,
              features=feature_data.target_features(target, tokens, taps),
              lengths=np.full((n,), s, np.int32),
              index=np.broadcast_to(np.arange(s - 1), (n, s - 1)).astype(
                  np.int32),
              weight=np.ones((n, s - 1), np.float32))


def train_net(taps=(), ttt=1):
  """(target f32, net, losses, tokens): an EagleNet (reading block inputs
  `taps` too: EAGLE-3) trained for STEPS full-batch steps (`ttt` passes)
  on the tiny target's continuations `tokens` (all positions). It fits
  them (teacher-forced top-1 ~0.9) but does not generalise to new random
  prompts of this random target."""
  target = testing.tiny_model()
  tokens = continuations(target)
  batch = full_batch(target, tokens, taps)
  net = eagle.create(target.config, seed=0, taps=taps)
  net_def, params, rest = nnx.split(net, nnx.Param, ...)
  target_def, target_params = nnx.split(target)
  tx = make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=10, steps=STEPS, grad_clip=1.0,
      weight_decay=0.0)))
  opt_state = tx.init(params)
  losses = []
  for _ in range(STEPS):
    params, opt_state, m = trainer.train_step(
        net_def, target_def, tx, 1.0, 0.1, params, opt_state, target_params,
        batch, rest, ttt=ttt)
    losses.append((float(m["loss"]), float(m["top1"])))
  return target, nnx.merge(net_def, params, rest), losses, tokens


@pytest.fixture(scope="module")
def trained():
  """EAGLE-1 (`train_net`)."""
  return train_net()


@pytest.fixture(scope="module")
def trained_eagle3():
  """EAGLE-3 (`train_net`): the input of block 1 fused with the final
  features, two training-time-test passes."""
  return train_net(taps=(1,), ttt=2)


@pytest.fixture(params=["eagle1", pytest.param(
    "eagle3", marks=pytest.mark.slow)])
def any_trained(request):
  """Each trained network in turn (EAGLE-3's in the slow tier)."""
  return request.getfixturevalue(
      "trained" if request.param == "eagle1" else "trained_eagle3")


def test_loss_falls_on_a_fixed_batch(trained):
  """SmoothL1 + 0.1 CE on one fixed batch: below 60 % of the first step's
  after STEPS steps, with teacher-forced top-1 agreement above 0.5."""
  losses = trained[2]
  print(f"loss {losses[0][0]:.3f} -> {losses[-1][0]:.3f}, top-1 "
        f"{losses[0][1]:.2f} -> {losses[-1][1]:.2f}")
  assert losses[-1][0] < 0.6 * losses[0][0]
  assert losses[-1][1] > 0.5


def drafted_chain(net, emb, feats, c, depth):
  """The drafter's features at depths 1..depth of a chain drafted after
  committing pass indices 0..c-1 (true features), fed its own predictions
  one node at a time, as it drafts: a list of `[B, D]`."""
  b = emb.shape[0]
  cache = net.init_cache(b, emb.shape[1])
  pos = jnp.broadcast_to(jnp.arange(1, c + 1, dtype=jnp.int32), (b, c))
  out, cache = net(emb[:, :c], feats[:, :c], pos, cache)
  chain = [out[:, -1]]
  for k in range(2, depth + 1):
    j = c + k - 2
    cache = cache._replace(length=jnp.full((b,), j, jnp.int32))
    f, cache = net(emb[:, j:j + 1], chain[-1][:, None],
                   jnp.full((b, 1), j + 1, jnp.int32), cache)
    chain.append(f[:, 0])
  return chain


def test_training_time_test_passes_are_the_drafted_chain(x64, any_trained):
  """Pass k of `forward_steps` (EAGLE-3's training-time test) at index i is
  exactly what the drafter computes at depth k of a chain drafted after
  committing index i-k+1: the true-feature context in its cache, then its
  own predictions fed back one node at a time (float64, 1e-10); with fused
  EAGLE-3 features too."""
  target, net = as_float64(*any_trained[:2])
  tokens = any_trained[3][:2, :14]
  feats = jnp.asarray(feature_data.target_features(target, tokens, net.taps),
                      jnp.float64)            # (bf16 storage, as trained)
  steps = 3
  preds = trainer.forward_steps(net, target, jnp.asarray(tokens), feats,
                                steps)
  emb = target.embed_tokens(jnp.asarray(tokens[:, 1:]))
  t = tokens.shape[1] - 1
  for i in (7, t - 1):
    c = i - steps + 2                       # committed entries 0 .. c-1
    chain = drafted_chain(net, emb, feats, c, steps)
    for k, f in enumerate(chain, start=1):  # depth k at index c + k - 2
      np.testing.assert_allclose(f, preds[k - 1][:, c + k - 2], atol=1e-10,
                                 err_msg=f"depth {k} index {c + k - 2}")
  # Depth-k predictions differ from the teacher-forced ones (else the test
  # would not tell the passes apart).
  assert float(jnp.abs(preds[2] - preds[0]).max()) > 1e-3


@pytest.mark.slow
def test_validation_chain_tau_counts_the_drafted_chains(x64, trained):
  """`chain_tau` equals chains drafted one node at a time (`drafted_chain`)
  and checked against the target's greedy tokens, counted here by hand;
  on the training rows the drafter gets some chains right and some wrong."""
  target, net = as_float64(*trained[:2])
  tokens = trained[3][:3, :16]
  n, depth = tokens.shape[1], 3
  starts = np.array([4, 9, 13])             # the last one hits the row's end
  batch = dict(full_batch(target, tokens),
               index=np.broadcast_to(starts, (3, len(starts))).astype(
                   np.int32),
               weight=np.ones((3, len(starts)), np.float32))
  feats = jnp.asarray(batch["features"], jnp.float64)
  got, weight = trainer.chain_tau(net, target, dict(batch, features=feats),
                                  depth)
  emb = target.embed_tokens(jnp.asarray(tokens[:, 1:]))
  greedy = np.asarray(jnp.argmax(target.head(feats), -1))   # x_{t+1} law
  total, taus = 0.0, []
  for i in starts:                          # chain start: pass index i
    chain = drafted_chain(net, emb, feats, i + 1, min(depth, n - 1 - i))
    for r in range(tokens.shape[0]):
      tau = 1
      for m, f in enumerate(chain, start=1):
        j = i + m - 1
        if j + 1 > n - 1:
          break
        drafted = int(jnp.argmax(target.head(f[r])))
        if drafted != greedy[r, j + 1]:
          break
        tau += 1
        if j + 2 > n - 1 or tokens[r, j + 2] != greedy[r, j + 1]:
          break
      taus.append(tau)
      total += tau
  assert float(weight) == len(taus)
  assert float(got) == total
  assert 1 < total / len(taus) < depth + 1 and len(set(taus)) > 1
  print(f"chain taus {taus}")


def test_loop_tau_replays_the_decoding_loop(x64, any_trained):
  """`loop_tau` on a text, from `chain_accepts` at every position, takes
  exactly the rounds the speculative engine takes to write that text with
  a chain of the same depth (greedy, float64); the position-averaged τ of
  the same chains is higher (it over-weights the easy stretches). With
  fused EAGLE-3 features too: what training measures is what decodes."""
  target, net = as_float64(*any_trained[:2])
  tokens, depth, new = any_trained[3], 3, 20
  prompts = [tokens[0, :6].tolist(), tokens[1, :6].tolist(), [5, 17, 99, 3]]
  tok = Tokenizer.byte_level()
  drafter = drafters_lib.make_drafter("eagle", target, eagle_net=net)
  spec = Generator(target, tok, max_new_tokens=new, eos_ids=(),
                   drafter=drafter, tree=f"chain{depth}").generate_ids(prompts)
  s = 6 + new
  text = np.zeros((len(prompts), s), np.int32)
  for r, (p, out) in enumerate(zip(prompts, spec)):
    text[r, :len(p) + new] = p + out.tokens
  p_len = np.array([len(p) for p in prompts], np.int32)
  n = p_len + new
  batch = dict(full_batch(target, text, net.taps), lengths=n)
  batch["weight"] = (batch["index"] >= p_len[:, None] - 1).astype(np.float32)
  batch["features"] = jnp.asarray(batch["features"], jnp.float64)
  acc = np.asarray(trainer.chain_accepts(net, target, batch, depth))
  for r in range(len(prompts)):
    one = lambda x, r=r: x[r:r + 1]  # noqa: E731
    tokens_r, rounds_r = trainer.loop_tau(
        one(acc), one(batch["index"]), one(batch["weight"]), one(p_len),
        one(n))
    assert rounds_r == spec[r].metrics["target_calls"] - 1, r
    assert tokens_r == new - 1
  got, weight = trainer.chain_tau(net, target, batch, depth)
  loop = trainer.loop_tau(acc, batch["index"], batch["weight"], p_len, n)
  print(f"loop tau {loop[0] / loop[1]:.3f}, position-averaged "
        f"{float(got) / float(weight):.3f}")
  assert loop[1] < loop[0] < float(got) / float(weight) * loop[1]


def test_training_time_test_trains_deeper_levels(trained):
  """A few steps with ttt=3 on the fixed batch report every pass's top-1,
  and the loss sums the passes (larger than the one-pass loss)."""
  target, net = trained[:2]
  batch = full_batch(target, trained[3][:8])
  net_def, params, rest = nnx.split(net, nnx.Param, ...)
  target_def, target_params = nnx.split(target)
  one, _ = trainer.eval_step(net_def, target_def, 1.0, 0.1, params,
                             target_params, batch, rest)
  three, stats = trainer.eval_step(net_def, target_def, 1.0, 0.1, params,
                                   target_params, batch, rest, ttt=3)
  assert {"top1", "top1_2", "top1_3"} <= set(stats)
  assert float(three) > float(one)
  assert float(stats["top1_3"]) < float(stats["top1"])


def as_float64(target_f32, net_f32):
  """The same weights in float64 (tiny_model draws are dtype-independent)."""
  target = testing.tiny_model("float64")
  cfg = eagle.eagle_config(target.config)
  net_def, _ = nnx.split(nnx.eval_shape(lambda: eagle.EagleNet(
      cfg, rngs=None, taps=net_f32.taps)))
  state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x,
                       nnx.state(net_f32))
  return target, nnx.merge(net_def, state)


def assert_same_as_ar(ar, spec):
  """Greedy speculative output equals autoregressive output exactly
  (float64): the same tokens, log-probabilities within 1e-10."""
  for a, b in zip(ar, spec):
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-10)


def f64_runs(trained):
  """(target f64, tokenizer, prompts, AR results, EAGLE drafter) for the
  float64 spec == AR cases: prefixes of the training sequences (where the
  drafter drafts well) and a fresh prompt (where it mostly fails)."""
  target, net = as_float64(*trained[:2])
  tokens = trained[3]
  prompts = [tokens[0, :6].tolist(), tokens[1, :9].tolist(),
             tokens[2, :3].tolist(), [5, 17, 99, 3]]
  tok = Tokenizer.byte_level()
  ar = Generator(target, tok, max_new_tokens=24, eos_ids=()).generate_ids(
      prompts)
  drafter = drafters_lib.make_drafter("eagle", target, eagle_net=net)
  return target, tok, prompts, ar, drafter


@pytest.mark.parametrize("kind,tree", [
    pytest.param("eagle1", "kary2x2x1", marks=pytest.mark.slow),
    ("eagle1", "dyn8d3k2"),
    pytest.param("eagle3", "kary2x2x1", marks=pytest.mark.slow),
    pytest.param("eagle3", "dyn8d3k2", marks=pytest.mark.slow),
    pytest.param("eagle1", "beam3x3", marks=pytest.mark.slow)])
def test_trained_eagle_tree_equals_autoregressive_float64(x64, request, kind,
                                                          tree):
  """Greedy speculative decoding with the trained EAGLE drafter (EAGLE-1,
  or EAGLE-3's fused features) and a static or a dynamic (EAGLE-2) tree
  equals greedy autoregressive decoding exactly (float64), for a batch of
  rows of different lengths: prefixes of its training sequences (where it
  drafts well, so that drafts are both accepted and rejected) and a fresh
  prompt (where it mostly fails)."""
  trained = request.getfixturevalue(
      "trained" if kind == "eagle1" else "trained_eagle3")
  target, tok, prompts, ar, drafter = f64_runs(trained)
  spec = Generator(target, tok, max_new_tokens=24, eos_ids=(),
                   drafter=drafter, tree=tree).generate_ids(prompts)
  assert_same_as_ar(ar, spec)
  accepted = [r.metrics["mean_accepted"] for r in spec]
  print(f"accepted drafts per round {accepted}")
  assert 0.5 < np.mean(accepted[:3]) < 3.0


@pytest.mark.parametrize("tree,lookup", [
    ("dyn8d3k2", 6),
    pytest.param("kary2x2x1", 4, marks=pytest.mark.slow)])
def test_a_merged_lookup_chain_equals_autoregressive_float64(x64, trained,
                                                            tree, lookup):
  """A prompt-lookup chain merged into an EAGLE drafter's tree (dynamic,
  or static and shallower than the chain): greedy output equals AR's
  exactly (float64)
  - with the trained drafter on the f64 case's rows, whose text rarely
    repeats, so most rounds verify the base tree's slots alone;
  - with an untrained drafter on a target whose text repeats
    (`testing.cyclic_model`), where the chain is accepted beyond the base
    tree's depth (EAGLE's window widened for it) and raises the accepted
    drafts per round."""
  target, tok, prompts, ar, drafter = f64_runs(trained)
  kw = dict(max_new_tokens=24, eos_ids=())
  gen = Generator(target, tok, drafter=drafters_lib.WithLookupChain(
      drafter, lookup), tree=tree, **kw)
  spec = gen.generate_ids(prompts)
  assert_same_as_ar(ar, spec)
  widths = spec[0].metrics["verify_width_rounds"]
  print(f"trained drafter, rounds per width {widths}")
  assert widths[gen.tree.base.num_nodes] > 0

  cyclic = testing.cyclic_model(dtype="float64")
  rows = [[10, 11, 12, 13, 14, 10, 11, 12], [40, 41, 42, 43, 44, 40],
          [5, 17, 99, 3]]
  refs = Generator(cyclic, tok, **kw).generate_ids(rows)
  net = eagle.create(cyclic.config, seed=0)
  assert net.fc[...].dtype == jnp.float64
  base = drafters_lib.make_drafter("eagle", cyclic, eagle_net=net)
  gen = Generator(cyclic, tok, drafter=drafters_lib.WithLookupChain(
      base, lookup), tree=tree, **kw)
  spec = gen.generate_ids(rows)
  assert_same_as_ar(refs, spec)
  depth = gen.tree.base.max_depth
  deeper = [r.metrics["accept_rate_by_depth"][depth:] for r in spec]
  plain = Generator(cyclic, tok, drafter=base, tree=tree,
                    **kw).generate_ids(rows)
  mean = lambda rs: np.mean([r.metrics["mean_accepted"] for r in rs])  # noqa: E731
  print(f"cyclic target: acceptance beyond depth {depth} {deeper}; "
        f"accepted per round {mean(spec):.2f} (without the chain "
        f"{mean(plain):.2f})")
  assert all(max(d) > 0.5 for d in deeper)
  assert mean(spec) > mean(plain) + 1.0


def test_a_packed_targets_eagle_drafter_runs_on_the_kernel_too(trained):
  """Serving an f32_packed target, the drafter packs a copy of its network
  (W_fc and its block's matmuls; the caller's net untouched) and drafts
  the same trees as for the f32 target: greedy speculative decoding gives
  AR's tokens wherever AR's margin exceeds 1e-4 (the float32 token rule),
  with the same accepted drafts per round as the unpacked drafter."""
  from seqdec.kernels.packed_matmul import PackedWeight
  from seqdec.models.transformer import with_precision
  target, net, _, tokens = trained
  packed_target = with_precision(target, "f32_packed")
  drafter = drafters_lib.make_drafter("eagle", packed_target, eagle_net=net)
  is_packed = lambda x: isinstance(x, PackedWeight)
  leaves = jax.tree.leaves(drafter.params[0], is_leaf=is_packed)
  assert sum(map(is_packed, leaves)) == 5     # fc, qkv, o, gate/up, down
  assert not isinstance(net.fc[...], PackedWeight)
  tok = Tokenizer.byte_level()
  prompts = [tokens[0, :6].tolist(), tokens[1, :9].tolist()]
  kw = dict(max_new_tokens=16, eos_ids=())
  ar = Generator(packed_target, tok, **kw).generate_ids(prompts)
  runs = [Generator(t, tok, drafter=d, tree="dyn8d3k2", **kw).generate_ids(
      prompts) for t, d in ((packed_target, drafter), (target, (
          drafters_lib.make_drafter("eagle", target, eagle_net=net))))]
  for a, s in zip(ar, runs[0]):
    d = first_divergence(a.tokens, s.tokens)
    if d is not None:
      assert a.margins[d] <= 1e-4, (d, a.margins[d])
  accepted = [[r.metrics["mean_accepted"] for r in run] for run in runs]
  np.testing.assert_allclose(accepted[0], accepted[1])
  assert min(accepted[0]) > 0.5


@pytest.mark.parametrize("streaming", [False, pytest.param(
    True, marks=pytest.mark.slow)])
def test_verify_budget_equals_autoregressive_float64(x64, trained, streaming):
  """With a verify budget (`seqdec.decoding.budget`) each round verifies
  the dynamic tree's best w slots, w from a ladder by the drafter's
  confidence, and growing stops where the frontier cannot repay a level
  (`DynamicTree.stop`, EAGLE's carry kept through the skipped levels);
  greedy output still equals autoregressive decoding exactly (float64),
  several widths are used, and so are the fused loop's nested per-width
  loops (`SpecLoop.decode`) and, streaming, the host loop's `lax.switch`
  among the widths' forwards (`SpecLoop.verify`)."""
  target, tok, prompts, ar, drafter = f64_runs(trained)
  budget = "1:0+2:0.3+4:0.9+8:1.6"
  used = {}
  for rows in (prompts[:3], prompts[3:]):   # confident rows, then a fresh one
    gen = Generator(target, tok, max_new_tokens=24, eos_ids=(),
                    drafter=drafter, tree="dyn8d3k2", budget=budget,
                    stop=0.3)
    spec = gen.generate_ids(rows, **(dict(stream=lambda *a: None)
                                     if streaming else {}))
    assert_same_as_ar(ar[:3] if len(rows) == 3 else ar[3:], spec)
    for w, count in spec[0].metrics["verify_width_rounds"].items():
      used[w] = used.get(w, 0) + count
  print(f"rounds per verify width {used}")
  assert sorted(used) == [1, 2, 4, 8]
  assert sum(1 for c in used.values() if c) >= 3
  if streaming:
    # A stop no frontier repays: every round grows level 1 alone (skipped
    # levels' slots hold -inf candidates); still exact, and the confident
    # rows accept fewer drafts per round than with the whole tree.
    rows = prompts[:3]
    kw = dict(max_new_tokens=24, eos_ids=(), drafter=drafter,
              tree="dyn8d3k2")
    whole = Generator(target, tok, **kw).generate_ids(rows)
    level1 = Generator(target, tok, stop=1e3, **kw).generate_ids(rows)
    for a, b in zip(ar[:3], level1):
      assert a.tokens == b.tokens
    mean = lambda rs: np.mean([r.metrics["mean_accepted"] for r in rs])  # noqa: E731
    print(f"accepted per round: whole tree {mean(whole):.2f}, "
          f"level 1 only {mean(level1):.2f}")
    assert mean(level1) < mean(whole)


def test_checkpoint_round_trip_and_refusals(tmp_path, trained):
  """float32 export restores exactly; bf16 within bf16 rounding; another
  target (fingerprint or shape), a missing or corrupt file are refused
  naming the path."""
  target, net = trained[:2]
  path = drafter_ckpt.save(str(tmp_path / "d"), net, target, dtype="float32")
  back, ids = drafter_ckpt.load(path, target)
  assert ids is None
  for a, b in zip(jax.tree.leaves(nnx.state(net)),
                  jax.tree.leaves(nnx.state(back))):
    np.testing.assert_array_equal(a, b)
  path16 = drafter_ckpt.save(str(tmp_path / "d16"), net, target,
                             keep_ids=np.arange(0, 200, 2))
  back16, ids = drafter_ckpt.load(path16, target)
  np.testing.assert_array_equal(ids, np.arange(0, 200, 2))
  for a, b in zip(jax.tree.leaves(nnx.state(net, nnx.Param)),
                  jax.tree.leaves(nnx.state(back16, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=1e-30)
  other = testing.tiny_model(seed=1)           # same shapes, other weights
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match="another target"):
    drafter_ckpt.load(path, other)
  wide = testing.tiny_model(hidden_size=32, intermediate_size=64)
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match="hidden_size=64"):
    drafter_ckpt.load(path, wide)
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match="missing drafter.json"):
    drafter_ckpt.load(str(tmp_path / "nowhere"), target)
  with open(os.path.join(path, drafter_ckpt.WEIGHTS), "r+b") as f:
    f.truncate(100)
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match=r"corrupt .*drafter\.safetensors"):
    drafter_ckpt.load(path, target)
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match="no eagle drafter is shipped"):
    drafter_ckpt.load_for(target, "")


def test_eagle3_checkpoint_round_trip_and_taps_checks(tmp_path):
  """An EAGLE-3 network restores with its taps and weights; a dataset whose
  features carry other taps, or bad taps options, are refused."""
  target = testing.tiny_model()
  net = eagle.create(target.config, seed=0, taps=(1,))
  path = drafter_ckpt.save(str(tmp_path / "d"), net, target, dtype="float32")
  back, _ = drafter_ckpt.load(path, target)
  assert back.taps == net.taps == (1,)
  for a, b in zip(jax.tree.leaves(nnx.state(net)),
                  jax.tree.leaves(nnx.state(back))):
    np.testing.assert_array_equal(a, b)

  class Fake:
    path, meta = "/data/x", {}
  with pytest.raises(feature_data.DataError, match="reads taps \\[1\\]"):
    trainer.check_dataset_taps(Fake(), net)
  Fake.meta = {"taps": [1]}
  trainer.check_dataset_taps(Fake(), net)
  trainer.check_dataset_taps(Fake(), eagle.create(target.config))  # final
  assert eagle.parse_taps("eagle3", 30) == (2, 15)
  for bad in ("0", "2,2", "3,1", "x", "30"):
    with pytest.raises(ValueError, match="taps"):
      eagle.parse_taps(bad, 30)


def test_bad_datasets_are_refused_by_name(tmp_path, trained):
  target = trained[0]
  with pytest.raises(feature_data.DataError, match="missing meta.json"):
    feature_data.FeatureDataset.open(str(tmp_path / "none"))
  path = str(tmp_path / "ds")
  feature_data.create(path, dict(target_fingerprint="abc"), 4, 8,
                      target.config.hidden_size, 2)
  with pytest.raises(feature_data.DataError, match="another target"):
    feature_data.FeatureDataset.open(path, feature_data.fingerprint(target))
  ds = feature_data.FeatureDataset.open(path)
  with pytest.raises(feature_data.DataError, match="outside the 0 finished"):
    ds.read(np.array([0]))
  meta = json.load(open(os.path.join(path, "meta.json")))
  feature_data.write_meta(path, dict(meta, done=2))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(path, "features"))
  with pytest.raises(feature_data.DataError,
                     match=r"cannot open array .*features"):
    feature_data.FeatureDataset.open(path)
  with open(os.path.join(path, "meta.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(feature_data.DataError, match="corrupt dataset"):
    feature_data.FeatureDataset.open(path)


class UnrenormalisedTrim(drafters_lib.EagleDrafter):
  """Negative control: drafts from the trimmed law but reports q without
  renormalising it over the kept set (scaled by 0.7, the kept mass it
  would have under the untrimmed softmax if the kept ids held 70 %)."""

  def propose(self, params, state, shape, rnd, target_cache, key):
    tree, state, cache = super().propose(params, state, shape, rnd,
                                         target_cache, key)
    return tree.replace(q=tree.q * 0.7), state, cache


@pytest.mark.parametrize("control,tree,proposal,trim", [
    pytest.param(False, "kary2x1", "iid", True, marks=pytest.mark.slow),
    pytest.param(True, "kary2x1", "iid", True, marks=pytest.mark.slow),
    pytest.param(False, "dyn6d3k2", "topk", False, marks=pytest.mark.slow),
])
def test_trimmed_head_sampling_keeps_the_target_law(trained, control, tree,
                                                    proposal, trim):
  """T=1: the joint law of the first two tokens over 4096 rows equals the
  target's (χ²) with i.i.d. children from the trimmed drafter (every other
  token id kept) and with a dynamic tree (deterministic children, verified
  by the lossless rule); reporting the trimmed drafter's q without
  renormalising it is detected."""
  from test_spec_sampling import (BATCH, P_MIN, ROWS,  # pylint: disable=g-import-not-at-top
                                  first_pair_chi2)
  target, net = trained[:2]
  prompt = trained[3][0, :6].tolist()     # where the drafter drafts well
  keep = np.arange(0, target.config.vocab_size, 2) if trim else None
  cls = UnrenormalisedTrim if control else drafters_lib.EagleDrafter
  drafter = cls(net, target, proposal=proposal, keep_ids=keep)
  gen = Generator(target, Tokenizer.byte_level(), max_new_tokens=3,
                  eos_ids=(), drafter=drafter, tree=tree, rule="sample",
                  temperature=1.0, max_batch=BATCH)
  results = gen.generate_ids([prompt] * ROWS, seed=11)
  stat, pvalue, dof = first_pair_chi2(target, prompt, results)
  accepted = np.mean([r.metrics["mean_accepted"] for r in results])
  print(f"control={control}: chi2 {stat:.1f} dof {dof} p {pvalue:.3g}, "
        f"accepted drafts per round {accepted:.2f}")
  assert accepted > 0.1, "the test must exercise acceptance"
  if control:
    assert pvalue < 1e-6
  else:
    assert pvalue > P_MIN


def test_concatenated_datasets_read_as_one(tmp_path):
  """Two datasets of one target (different sequence lengths) read as one:
  rows in order, shorter sequences zero-padded; another target refused."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  parts = []
  for i, (rows, seq) in enumerate([(3, 6), (2, 9)]):
    path = str(tmp_path / f"p{i}")
    feature_data.create(path, dict(target_fingerprint="t"), rows, seq, 4,
                        rows)
    ds = feature_data.FeatureDataset.open(path)
    tok = np.arange(rows * seq, dtype=np.int32).reshape(rows, seq) + 100 * i
    ds.arrays["tokens"][...].write(tok).result()
    ds.arrays["lengths"][...].write(np.full(rows, seq, np.int32)).result()
    ds.arrays["prompt_lens"][...].write(np.ones(rows, np.int32)).result()
    ds.arrays["features"][...].write(np.ones(
        (rows, seq, 4), ml_dtypes.bfloat16) * (i + 1)).result()
    feature_data.write_meta(path, dict(ds.meta, done=1))
    parts.append((path, tok))
  both = feature_data.ConcatDataset.open(",".join(p for p, _ in parts), "t")
  assert both.rows == 5 and both.meta["seq_len"] == 9
  got = both.read(np.array([4, 0, 2]))
  np.testing.assert_array_equal(got["tokens"][0], parts[1][1][1])
  np.testing.assert_array_equal(got["tokens"][1, :6], parts[0][1][0])
  assert (got["tokens"][1, 6:] == 0).all() and got["features"].shape == (
      3, 9, 4)
  assert float(got["features"][2, 0, 0]) == 1.0 and float(
      got["features"][0, 8, 0]) == 2.0
  with pytest.raises(feature_data.DataError, match="another target"):
    feature_data.ConcatDataset.open(parts[0][0], "other")
