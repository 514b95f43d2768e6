"""Array primitives of `seqdec.ops` and the margin read from logits."""

import jax.numpy as jnp
import numpy as np

from seqdec.decoding.autoregressive import top2_margin
from seqdec.decoding.trees import chain, kary
from seqdec.ops import argmax_last


def test_argmax_last_equals_argmax_with_ties_and_nans():
  """First index of the max (ties: the first; a NaN row: the first NaN),
  as jnp.argmax."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 50)).astype(np.float32)
  x[0, 0, [7, 30]] = 9.0                       # a tie: 7
  x[1, 2, 11] = np.nan                          # a NaN: 11
  x[2, 3, [4, 40]] = np.nan                     # two NaNs: 4
  got = np.asarray(argmax_last(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), -1)))
  assert got[0, 0] == 7 and got[1, 2] == 11 and got[2, 3] == 4


def test_top2_margin_is_zero_on_a_tie():
  x = jnp.asarray([[1.0, 5.0, 3.0, 5.0], [1.0, 5.0, 3.0, 2.0]])
  np.testing.assert_array_equal(np.asarray(top2_margin(x)), [0.0, 2.0])


def test_is_chain():
  assert chain(4).is_chain and chain(0).is_chain
  assert not kary((2, 1)).is_chain
