"""Speculative sampling is lossless: chi-squared tests against the target.

Toy world: a vocabulary of V = 6 tokens, a Markov target P[a] = p(. | prev
token a) and a different Markov draft Q[a]. A tree under the root token is
drafted from Q (each child from Q[its parent's token]) by the scheme under
test, the target's logits at node i are log P[tokens[i]], and the rule is run
once over B = 22000 rows (one row per draw, each with its own key). The
first L = 3 emitted tokens (completed from the exact target when a row
emitted fewer, as the next round would) are compared with the exact joint
P[root, a] P[a, b] P[b, c] by a chi-squared goodness-of-fit test (cells of
expected count < 5 pooled). Each lossless case must give p > 0.001; each
negative control (the same walk with one step function swapped for a known
mistake) must give p < 0.001 on the same data. Seeds are fixed, so every
p-value is deterministic; run with -s to see them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from seqdec.decoding import tree_specs
from seqdec.decoding import trees
from seqdec.decoding import verify
from seqdec.errors import ConfigError
from seqdec.decoding.sampling import SamplingParams

V = 6          # toy vocabulary
ROOT = 0       # the root token (context)
B = 22_000     # draws per test (rows of one batched rule call)
L = 3          # emitted-prefix length whose joint law is tested
ALPHA_LEVEL = 1e-3

KARY = trees.kary((3, 2))     # 3 children at the root, 2 under each
CHAIN = trees.chain(3)
STATIC = tree_specs.parse("static6")


def _markov(seed: int, scale: float) -> np.ndarray:
  """`[V, V]` row-stochastic matrix: softmax(scale * N(0, 1))."""
  z = np.random.default_rng(seed).normal(size=(V, V)) * scale
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


P = _markov(0, 1.0)    # target
Q = _markov(1, 1.5)    # draft: different and more peaked


# ---------------------------------------------------------------------------
# Drafting, the rule call, and the chi-squared test.

# Scheme names, per parent depth (or per node when N names are given): how
# a node's children are drafted.
#   "iid": i.i.d. from Q[parent]; "wor": Gumbel-top-k from Q[parent];
#   "topk": the top ranks of Q[parent]; "fixed": a fixed token per rank,
#   independent of Q (n-gram-like static proposals; about 20% missing).
_SCHEME = {"iid": trees.IID, "wor": trees.WITHOUT_REPLACEMENT,
           "topk": trees.DETERMINISTIC, "fixed": trees.DETERMINISTIC}


def draft(seed: int, shape: trees.TreeShape, schemes: tuple[str, ...],
          p_table: np.ndarray = P, q_table: np.ndarray = Q, batch: int = B):
  """B trees drafted (in NumPy) from the Markov draft, with target logits.

  Returns `(tree, logits [batch, N, V])`; node i's q is Q[tokens[i]].
  """
  n, depth = shape.num_nodes, shape.depth
  per_node = schemes if len(schemes) == n else tuple(
      schemes[d] if d < len(schemes) else "topk" for d in depth)
  rng = np.random.default_rng(seed)
  gumbel = rng.gumbel(size=(batch, n, V))
  with np.errstate(divide="ignore"):    # log 0 = -inf: never drafted
    logq, logp = np.log(q_table), np.log(p_table)
  tokens = np.full((batch, n), ROOT, np.int32)
  for i in range(1, n):
    a, rank = shape.parents[i], shape.ranks[i]
    lq = logq[tokens[:, a]]                                          # [B, V]
    kind = per_node[a]
    if kind == "iid":       # own noise per child: independent draws
      tokens[:, i] = np.argmax(lq + gumbel[:, i], axis=-1)
    elif kind == "wor":     # the parent's noise shared: Gumbel-top-k
      tokens[:, i] = np.argsort(-(lq + gumbel[:, a]), axis=-1)[:, rank]
    elif kind == "topk":
      tokens[:, i] = np.argsort(-lq, axis=-1)[:, rank]
    else:
      tokens[:, i] = (tokens[:, a] + 1 + rank) % V
  valid = np.ones((batch, n), bool)
  if "fixed" in per_node:
    valid[:, 1:] = rng.random((batch, n - 1)) < 0.8
  scheme = np.asarray([_SCHEME[k] for k in per_node], np.int32)
  tree = trees.Tree.from_shape(
      shape, jnp.asarray(tokens), valid=jnp.asarray(valid), scheme=scheme,
      q=jnp.asarray(q_table[tokens], jnp.float32))
  return tree, jnp.asarray(logp[tokens], jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def accept(rule, tree, logits, keys, sparams, max_depth):
  return rule(tree, logits, keys, sparams, max_depth)


greedy = jax.jit(verify.Greedy(), static_argnames="max_depth")


def run(rule, shape, schemes, seed, sparams=None, p_table=P, q_table=Q,
        scheme=None):
  """Drafts B trees and runs `rule`, with every node's scheme code set to
  `scheme` if given; returns `(Verdict, tree, logits)`."""
  tree, logits = draft(seed, shape, schemes, p_table, q_table)
  if sparams is None:
    sparams = SamplingParams.make(B, temperature=1.0)
  keys = jax.random.split(jax.random.key(seed), B)
  used = tree if scheme is None else tree.replace(
      scheme=jnp.full_like(tree.scheme, scheme))
  acc = accept(rule, used, logits, keys, sparams, shape.max_depth)
  return acc, tree, logits


def completed_prefix(acc, target: np.ndarray, seed: int) -> np.ndarray:
  """`[B, L]` first L emitted tokens; rows that emitted fewer continue by
  sampling from the exact target `[V, V]`, as the next round would."""
  tokens = np.asarray(acc.tokens)
  emitted = np.asarray(acc.num_accepted) + 1
  rng = np.random.default_rng(seed)
  out = np.zeros((tokens.shape[0], L), np.int64)
  width = min(L, tokens.shape[1])
  out[:, :width] = tokens[:, :width]
  cdf = np.cumsum(target, axis=-1)
  for d in range(1, L):
    short = emitted <= d
    prev = out[short, d - 1]
    u = rng.random(short.sum())
    out[short, d] = np.minimum((u[:, None] > cdf[prev]).sum(-1), V - 1)
  return out


def exact_joint(target: np.ndarray) -> np.ndarray:
  """`[V] * L` law of the first L tokens after ROOT under Markov `target`."""
  joint = target[ROOT]                     # last axis: the previous token
  for d in range(1, L):
    joint = joint[..., None] * target.reshape((1,) * (d - 1) + (V, V))
  return joint


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> tuple[float, int,
                                                                   float]:
  """Pearson chi-squared goodness of fit of `[B, L]` samples to `probs`.

      X^2 = sum_cells (O - E)^2 / E,  df = cells - 1,  p = P(chi2_df > X^2)

  Cells with expected count E < 5 are pooled into one cell (and that pool,
  if still below 5, into the smallest regular cell), so the chi-squared
  approximation holds. Returns (X^2, df, p).
  """
  n = samples.shape[0]
  flat = np.ravel_multi_index(samples.T, probs.shape)
  observed = np.bincount(flat, minlength=probs.size).astype(np.float64)
  expected = probs.ravel() * n
  small = expected < 5
  obs = list(observed[~small])
  exp = list(expected[~small])
  if small.any():
    pool_o, pool_e = observed[small].sum(), expected[small].sum()
    if pool_e < 5:
      j = int(np.argmin(exp))
      obs[j] += pool_o
      exp[j] += pool_e
    else:
      obs.append(pool_o)
      exp.append(pool_e)
  obs, exp = np.asarray(obs), np.asarray(exp)
  # Every draw must land in a cell of positive probability.
  assert observed[expected == 0].sum() == 0, "a draw of target probability 0"
  stat = float(((obs - exp) ** 2 / exp).sum())
  df = len(exp) - 1
  return stat, df, float(stats.chi2.sf(stat, df))


def chi2_of(acc, name: str, target: np.ndarray = P, rows=None,
            seed: int = 0) -> float:
  """Chi-squared p-value of the rule's first L emitted tokens; printed."""
  if rows is not None:
    acc = jax.tree.map(lambda a: np.asarray(a)[rows], acc)
  samples = completed_prefix(acc, target, seed)
  stat, df, p = chi2_pvalue(samples, exact_joint(target))
  tau = float(np.mean(np.asarray(acc.num_accepted) + 1))
  print(f"\n  {name}: X2={stat:.1f} df={df} p={p:.3g} (draws={len(samples)}, "
        f"tau={tau:.3f})", end="")
  return p


# Known mistakes, each written as a lossless step plus one change.
def resample_from_p(t):
  """Chain bug: after a rejection the bonus comes from p, not the residual."""
  accepted, _ = verify.iid_step(t)
  return accepted, t.p


def residual_not_updated(t):
  """Multi-draft bug: every sibling is tested against p (r never updated)."""
  return verify.iid_step(t._replace(r=t.p))


def q_not_renormalised(t):
  """Without-replacement bug: q is not renormalised over undrawn tokens."""
  return verify.iid_step(t)


# Negative controls: the lossless walk with one step swapped. The mistaken
# steps are appended after the lossless ones (scheme codes 3..6) and a
# control run points every node's scheme at its mistake, so one compiled
# rule per tree shape serves all controls (and, with codes 0..2 and no
# Greedy override, the test of the bare walk at temperature 0).
CONTROLS = verify.Sample(greedy_rows=False, steps=verify.LOSSLESS_STEPS + (
    resample_from_p,        # 3: chain, sampled draft
    residual_not_updated,   # 4: i.i.d. siblings
    verify.iid_step,        # 5: deterministic (top-k) children tested as
                            #    if sampled from q
    q_not_renormalised,     # 6: without replacement
))

CASES = {
    # name: (shape, schemes by parent depth, control scheme code or None)
    "chain_sampled": (CHAIN, ("iid",) * 3, 3),
    "iid_3x2": (KARY, ("iid", "iid"), 4),
    "topk_3x2": (KARY, ("topk", "topk"), 5),
    "static6_fixed": (STATIC, ("fixed",) * 4, None),
    "wor_3x2": (KARY, ("wor", "wor"), 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lossless_scheme(case):
  shape, schemes, control = CASES[case]
  seed = sorted(CASES).index(case)
  acc, _, _ = run(verify.Sample(), shape, schemes, seed)
  p = chi2_of(acc, f"{case} sample")
  assert p > ALPHA_LEVEL, f"{case}: chi2 p = {p:.3g}"
  if control is not None:
    bad, _, _ = run(CONTROLS, shape, schemes, seed, scheme=control)
    p_bad = chi2_of(bad, f"{case} negative control")
    assert p_bad < ALPHA_LEVEL, f"{case} control not detected: p = {p_bad:.3g}"


def test_mixed_schemes_and_temperatures():
  """Schemes mixed within a level (root: without replacement; its children:
  i.i.d., top-k, without replacement), in a batch mixing temperature-0 rows
  (which must equal Greedy exactly) with temperature-0.7, top-k=4,
  top-p=0.9 rows (which must follow the processed target)."""
  temperature = np.full(B, 0.7, np.float32)
  temperature[::11] = 0.0
  t0 = temperature == 0
  sparams = SamplingParams.make(B, temperature=temperature, top_k=4,
                                top_p=0.9)
  schemes = ("wor", "iid", "topk", "wor") + ("topk",) * 6
  acc, tree, logits = run(verify.Sample(), KARY, schemes, 7, sparams)
  want = greedy(tree, logits, max_depth=KARY.max_depth)
  for field in ("path", "num_accepted", "tokens", "logprobs"):
    np.testing.assert_array_equal(np.asarray(getattr(acc, field))[t0],
                                  np.asarray(getattr(want, field))[t0],
                                  err_msg=field)
  # Processed target: log P / 0.7, the top 4 kept, then the nucleus of
  # mass 0.9 (tokens whose sorted mass before them is < 0.9).
  z = np.log(P) / 0.7
  z = np.where(z >= np.sort(z, -1)[:, -4:-3], z, -np.inf)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1)
  ranked = np.take_along_axis(probs, order, -1)
  before = np.cumsum(ranked, -1) - ranked
  assert np.abs(before - 0.9).min() > 1e-3     # no float-rounding edge case
  keep = np.zeros_like(probs, bool)
  np.put_along_axis(keep, order, before < 0.9, -1)
  target = np.where(keep, probs, 0.0)
  target /= target.sum(-1, keepdims=True)
  p = chi2_of(acc, "mixed wor/iid/topk, T=0.7 top_k=4 top_p=0.9", target=target,
              rows=~t0)
  assert p > ALPHA_LEVEL


def test_greedy_rows_walk_exactly_with_distinct_siblings():
  """At temperature 0 the walk itself (one-hot residuals, no Greedy
  override) reproduces Greedy when siblings are distinct (top-k children)."""
  tree, _ = draft(11, KARY, ("topk", "topk"))
  logits = jax.random.normal(jax.random.key(12), tree.tokens.shape + (V,)) * 3
  got = accept(CONTROLS, tree, logits, jax.random.split(jax.random.key(13), B),
               SamplingParams.make(B, temperature=0.0), KARY.max_depth)
  want = greedy(tree, logits, max_depth=KARY.max_depth)
  for field in ("path", "num_accepted", "tokens", "logprobs"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                  np.asarray(getattr(want, field)))
  counts = np.bincount(np.asarray(got.num_accepted),
                       minlength=KARY.max_depth + 1)
  assert (counts > 0).all(), counts    # every depth of acceptance occurs


# ---------------------------------------------------------------------------
# Trees without q (every child deterministic): `Sample` walks on scalars
# (`verify.deterministic_walk`) instead of `[V]` residuals.

def test_deterministic_fast_path_is_lossless():
  """Top-k children with no q recorded (as dynamic trees, n-gram and merged
  lookup chains come) take the scalar walk; their first tokens follow the
  target."""
  tree, logits = draft(21, KARY, ("topk", "topk"))
  tree = tree.replace(q=None)
  keys = jax.random.split(jax.random.key(21), B)
  acc = accept(verify.Sample(), tree, logits, keys,
               SamplingParams.make(B, temperature=1.0), KARY.max_depth)
  assert chi2_of(acc, "topk_3x2 without q (scalar walk)") > ALPHA_LEVEL


def test_deterministic_fast_path_equals_the_vector_walk():
  """The scalar walk returns the `[V]`-residual walk's verdict for the same
  uniforms, on trees with repeated siblings (a repeat of a rejected token
  is never accepted), invalid nodes, and greedy (one-hot) rows; only a
  test that rounding decides (u within ~1e-7 of r(x)) may differ."""
  n_rows = 4096
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, V, size=(n_rows, KARY.num_nodes)).astype(np.int32)
  tokens[:, 0] = ROOT
  valid = rng.random(tokens.shape) < 0.85
  tree = trees.Tree.from_shape(KARY, jnp.asarray(tokens),
                               valid=jnp.asarray(valid))
  # Peaked per-node targets, so that every depth is reached.
  logits = jnp.asarray(rng.normal(size=tokens.shape + (V,)) * 2.5,
                       jnp.float32)
  temperature = np.where(np.arange(n_rows) % 8 == 0, 0.0, 1.0)
  sparams = SamplingParams.make(n_rows, temperature=temperature)
  keys = jax.random.split(jax.random.key(6), n_rows)
  fast, slow = (accept(rule, tree, logits, keys, sparams, KARY.max_depth)
                for rule in (verify.Sample(), verify.SampleVector()))
  differ = np.zeros(n_rows, bool)
  for field in ("path", "num_accepted", "tokens"):
    got, want = np.asarray(getattr(fast, field)), np.asarray(getattr(slow,
                                                                     field))
    differ |= (got != want).reshape(n_rows, -1).any(1)
  assert differ.sum() <= 1, np.flatnonzero(differ)[:10]
  d = np.asarray(fast.num_accepted)
  assert (np.bincount(d, minlength=KARY.max_depth + 1) > 100).all()
  # Repeated siblings occur, and a repeat is never the accepted child.
  path = np.asarray(fast.path)
  parents = np.asarray(KARY.parents)
  first = path[:, 1]
  sib = parents == 0
  repeats = [(r, j) for r in range(n_rows) for j in np.flatnonzero(sib)
             if valid[r, j] and any(valid[r, i] and tokens[r, i] == tokens[r, j]
                                    for i in np.flatnonzero(sib) if i < j)]
  assert len(repeats) > 100
  assert not any(d[r] >= 1 and first[r] == j for r, j in repeats
                 if temperature[r] > 0)


# ---------------------------------------------------------------------------
# Acceptance rate: a chain with per-node acceptance exactly alpha.

def overlap_pair(alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """Markov p, q `[V, V]` with sum_v min(p(v|a), q(v|a)) = alpha for all a.

      p(.|a) = alpha c_a + (1 - alpha) e_a
      q(.|a) = alpha c_a + (1 - alpha) f_a

  with c_a, e_a, f_a supported on disjoint token pairs (rotated by a), so
  min(p, q) = alpha c_a and a sampled draft is accepted with probability
  exactly alpha at every node.
  """
  rng = np.random.default_rng(3)
  p, q = np.zeros((V, V)), np.zeros((V, V))
  for a in range(V):
    c, e, f = (np.roll(np.arange(V), -a)[k:k + 2] for k in (0, 2, 4))
    w = rng.dirichlet(np.ones(2), size=3)
    p[a, c] += alpha * w[0]
    q[a, c] += alpha * w[0]
    p[a, e] += (1 - alpha) * w[1]
    q[a, f] += (1 - alpha) * w[2]
  return p, q


def test_chain_acceptance_rate_matches_alpha():
  alpha, gamma = 0.6, CHAIN.max_depth
  p_table, q_table = overlap_pair(alpha)
  assert np.allclose(np.minimum(p_table, q_table).sum(-1), alpha)
  acc, _, _ = run(verify.Sample(), CHAIN, ("iid",) * gamma, seed=5,
                  p_table=p_table, q_table=q_table)
  tau = np.asarray(acc.num_accepted) + 1.0
  expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
  se = tau.std(ddof=1) / np.sqrt(tau.size)
  print(f"\n  alpha={alpha} gamma={gamma}: tau={tau.mean():.4f} expected="
        f"{expected:.4f} se={se:.4f} z={(tau.mean() - expected) / se:+.2f} "
        f"(draws={tau.size})", end="")
  assert abs(tau.mean() - expected) < 4 * se


# ---------------------------------------------------------------------------
# The lossy rule is lossy; interface checks.

def test_typical_lossy_is_greedy_at_t0_and_biased_at_t1():
  rule = verify.make_rule("typical_lossy", max_top_k=64)
  acc, tree, logits = run(rule, KARY, ("iid", "iid"), seed=0)
  p = chi2_of(acc, "typical_lossy (must fail: lossy)")
  assert p < ALPHA_LEVEL
  got = accept(rule, tree, logits, jax.random.split(jax.random.key(0), B),
               SamplingParams.make(B, temperature=0.0), KARY.max_depth)
  want = greedy(tree, logits, max_depth=KARY.max_depth)
  for field in ("path", "num_accepted", "tokens"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                  np.asarray(getattr(want, field)))


def test_sampled_scheme_without_q_is_refused():
  tokens = jnp.zeros((2, CHAIN.num_nodes), jnp.int32)
  tree = trees.Tree.from_shape(CHAIN, tokens, scheme=trees.IID)
  logits = jnp.zeros((2, CHAIN.num_nodes, V))
  with pytest.raises(ValueError, match="no q"):
    verify.Sample()(tree, logits, jax.random.split(jax.random.key(0), 2),
                    SamplingParams.make(2, temperature=1.0), CHAIN.max_depth)


def test_rules_by_name():
  assert isinstance(verify.make_rule("sample", max_top_k=64), verify.Sample)
  assert isinstance(verify.make_rule("typical_lossy", max_top_k=64),
                    verify.TypicalLossy)
  assert verify.make_rule("sample", max_top_k=128).max_top_k == 128
  vector = verify.make_rule("sample_vector", max_top_k=128)
  assert isinstance(vector, verify.Sample) and not vector.scalar_walk
  assert vector.max_top_k == 128
  assert isinstance(verify.make_rule("greedy", max_top_k=64), verify.Greedy)
  with pytest.raises(ConfigError, match="unknown acceptance rule"):
    verify.make_rule("best", max_top_k=64)
