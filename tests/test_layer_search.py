"""The greedy layer-subset search of the layer-skip drafter."""

import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import layer_search
from seqdec.decoding import rank_statistics
from seqdec.decoding.drafters.model import layer_skip, parse_layers


def test_greedy_path_drops_the_least_useful_block_first():
  """A synthetic a(S) = sum of per-block weights: the path drops blocks in
  increasing weight, ties to the lower index; the cost model trades tau
  against |S| / L."""
  weight = {0: 0.3, 1: 0.01, 2: 0.2, 3: 0.01, 4: 0.48}
  calls = []

  def agreement(keep):
    calls.append(tuple(keep))
    return sum(weight[i] for i in keep)
  path = layer_search.greedy_search(agreement, 5, min_keep=2)
  assert [s.keep for s in path] == [(0, 1, 2, 3, 4), (0, 2, 3, 4),
                                    (0, 2, 4), (0, 4)]
  np.testing.assert_allclose([s.agreement for s in path],
                             [1.0, 0.99, 0.98, 0.78])
  assert len(calls) == 1 + 5 + 4 + 3
  step, g, speed = layer_search.best_chain(path, 5, verify_cost=1.0)
  want = max((layer_search.chain_tau(s.agreement, n)
              / (1 + n * len(s.keep) / 5), s.keep, n)
             for s in path[1:] for n in range(1, 9))
  assert speed == pytest.approx(want[0]) and (step.keep, g) == want[1:]
  # A costlier verify favours longer chains.
  assert layer_search.best_chain(path, 5, verify_cost=4.0)[1] >= g
  assert layer_search.chain_tau(0.5, 2) == pytest.approx(1.75)
  with pytest.raises(ValueError, match="min_keep"):
    layer_search.greedy_search(agreement, 5, min_keep=0)
  with pytest.raises(ValueError, match="no proper subset"):
    layer_search.best_chain(path[:1], 5)


@pytest.mark.parametrize("keep", [(0, 1, 2, 5), (3,), (0, 2, 3, 4, 5)])
def test_layer_spec_round_trips(keep):
  spec = layer_search.as_spec(keep)
  assert parse_layers(spec, 6) == keep


def test_agreement_equals_rank_one_statistics():
  """a(S) from the once-computed target pass == the mean top-1 hit of
  `rank_statistics` with a layer-skip drafter of S (tiny Gemma 3: sliding
  windows shorter than the sequence)."""
  target = testing.tiny_gemma3()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, target.config.vocab_size, (2, 32)).astype(np.int32)
  first, roots = np.array([5, 9]), 16
  valid = np.ones((2, roots), bool)
  valid[1, 12:] = False
  agreement = layer_search.agreement_fn(target, tokens, first, roots, valid)
  for keep in [(0, 5), (1, 2, 3)]:
    s, _ = rank_statistics.rank_statistics(target, layer_skip(target, keep),
                                           tokens, first, roots, 0.0, 1)
    assert agreement(keep) == pytest.approx(s[..., 0][valid].mean())
