"""`seqdec.parallel.scan.linear_scan`: every back end against `lax.scan`.

Error measure (issue 6): per sequence (batch row), max|delta| / max|ref| over
time and channels, then the worst row. Elementwise relative error means
nothing where a contractive state decays to ~0. Bounds: float32 1e-5, float64
1e-10. The sequential back end itself is checked against a NumPy loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec.parallel import scan

BATCH = 3
H = {"diagonal": 5, "block2": 4, "dense": 6}
# Back ends compared with the reference, as (impl, chunk): chunk 16 gives
# several chunks and padding at T = 128 / 4097; chunk 3 pads T = 7.
VARIANTS = (("associative", 16), ("chunked", 16), ("chunked", 3))


def random_system(structure, t, dtype, seed=0):
  """Contractive A (|a| < 1, 2x2 blocks / dense with spectral norm < 1)."""
  h = H[structure]
  rng = np.random.default_rng(seed)
  if structure == "diagonal":
    a = rng.uniform(-0.99, 0.99, (t, BATCH, h))
    b = rng.normal(size=(t, BATCH, h))
  elif structure == "block2":
    # Each 2x2 block has entries in (-0.45, 0.45): spectral norm < 0.9.
    a = rng.uniform(-0.45, 0.45, (t, BATCH, 2, 2, h))
    b = rng.normal(size=(t, BATCH, 2, h))
  else:
    m = rng.normal(size=(t, BATCH, h, h))
    a = 0.95 * m / np.linalg.norm(m, ord=2, axis=(-2, -1))[..., None, None]
    b = rng.normal(size=(t, BATCH, h))
  h0 = rng.normal(size=b.shape[1:])
  return (jnp.asarray(a, dtype), jnp.asarray(b, dtype),
          jnp.asarray(h0, dtype))


def rel_error(out, ref):
  """max over rows of max|out - ref| / max|ref| (row = batch index 1)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  axes = tuple(i for i in range(out.ndim) if i != 1)
  return float(np.max(np.max(np.abs(out - ref), axis=axes)
                      / np.max(np.abs(ref), axis=axes)))


@functools.partial(jax.jit, static_argnums=(3,))
def all_backends(a, b, h0, structure):
  """{(impl, chunk, reverse): states} for every variant and the reference."""
  out = {}
  for reverse in (False, True):
    out[("sequential", 0, reverse)] = scan.linear_scan(
        a, b, h0, structure=structure, impl="sequential", reverse=reverse)
    for impl, chunk in VARIANTS:
      out[(impl, chunk, reverse)] = scan.linear_scan(
          a, b, h0, structure=structure, impl=impl, reverse=reverse,
          chunk=chunk)
  return out


def check_all(structure, t, dtype, bound):
  a, b, h0 = random_system(structure, t, dtype)
  out = all_backends(a, b, h0, structure)
  errors = {}
  for (impl, chunk, reverse), h in out.items():
    assert h.shape == b.shape and h.dtype == b.dtype
    ref = out[("sequential", 0, reverse)]
    errors[(impl, chunk, reverse)] = rel_error(h, ref)
  print(f"{structure} T={t} {jnp.dtype(dtype).name}: worst "
        f"{max(errors.values()):.2e}")
  bad = {k: v for k, v in errors.items() if not v <= bound}
  assert not bad, bad
  return out, (a, b, h0)


def numpy_reference(a, b, h0, structure, reverse):
  """The recurrence as a plain float64 loop (checks the reference)."""
  a, b, h = (np.asarray(x, np.float64) for x in (a, b, h0))
  out = np.zeros_like(b)
  order = range(b.shape[0] - 1, -1, -1) if reverse else range(b.shape[0])
  for t in order:
    if structure == "diagonal":
      h = a[t] * h + b[t]
    elif structure == "block2":
      h = np.einsum("...ijk,...jk->...ik", a[t], h) + b[t]
    else:
      h = np.einsum("...ij,...j->...i", a[t], h) + b[t]
    out[t] = h
  return out


def check_with_numpy(structure, t, dtype, bound, reference_bound):
  """check_all, and the lax.scan reference itself against NumPy."""
  out, (a, b, h0) = check_all(structure, t, dtype, bound)
  for reverse in (False, True):
    ref = numpy_reference(a, b, h0, structure, reverse)
    assert rel_error(out[("sequential", 0, reverse)], ref) <= reference_bound


@pytest.mark.parametrize("structure", scan.STRUCTURES)
@pytest.mark.parametrize("t", [1, 7, 128])
def test_backends_equal_reference_f32(structure, t):
  check_with_numpy(structure, t, jnp.float32, 1e-5, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("structure", scan.STRUCTURES)
def test_backends_equal_reference_f32_long(structure):
  check_all(structure, 4097, jnp.float32, 1e-5)


@pytest.mark.parametrize("structure", scan.STRUCTURES)
def test_backends_equal_reference_f64(x64, structure):
  check_with_numpy(structure, 7, jnp.float64, 1e-10, 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("structure", scan.STRUCTURES)
@pytest.mark.parametrize("t", [1, 128, 4097])
def test_backends_equal_reference_f64_slow(x64, structure, t):
  check_all(structure, t, jnp.float64, 1e-10)


def test_reverse_is_the_adjoint_direction():
  """Reverse equals the forward scan of the time-flipped system."""
  a, b, h0 = random_system("diagonal", 9, jnp.float32, seed=3)
  rev = scan.linear_scan(a, b, h0, impl="chunked", chunk=4, reverse=True)
  fwd = scan.linear_scan(a[::-1], b[::-1], h0, impl="sequential")[::-1]
  assert rel_error(rev, fwd) <= 1e-6
  assert rel_error(rev, scan.linear_scan(a, b, h0, impl="sequential")) > 0.1


def test_low_precision_inputs_accumulate_in_f32():
  a, b, h0 = random_system("diagonal", 64, jnp.float32, seed=1)
  ref = scan.linear_scan(a.astype(jnp.bfloat16).astype(jnp.float32),
                         b.astype(jnp.bfloat16).astype(jnp.float32),
                         h0.astype(jnp.bfloat16).astype(jnp.float32),
                         impl="sequential")
  out = scan.linear_scan(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                         h0.astype(jnp.bfloat16), impl="chunked", chunk=8)
  assert out.dtype == jnp.bfloat16
  # Only the final rounding to bf16 (2^-8 relative) separates the two.
  assert rel_error(out, ref) <= 2 ** -8


def test_h0_defaults_to_zeros():
  a, b, _ = random_system("diagonal", 10, jnp.float32)
  out = scan.linear_scan(a, b, impl="chunked", chunk=4)
  ref = scan.linear_scan(a, b, jnp.zeros(b.shape[1:]), impl="sequential")
  assert rel_error(out, ref) <= 1e-6


def test_auto_resolution(monkeypatch):
  """'auto' follows the measured crossover table for the call's context
  (b overwritable or live), and never picks chunked for block2 / dense."""
  table = {"overwrite": {"64": 256, "1024": None}, "live": {"64": None}}
  monkeypatch.setattr(scan, "crossover_table", lambda: table)
  assert scan.resolve_impl("auto", "diagonal", 4096, 64) == "chunked"
  assert scan.resolve_impl("auto", "diagonal", 4096, 64, channels=8) == (
      "chunked")                          # below every C: the smallest's
  assert scan.resolve_impl("auto", "diagonal", 4096, 64,
                           channels=4096) == "sequential"
  assert scan.resolve_impl("auto", "diagonal", 255, 64) == "sequential"
  assert scan.resolve_impl("auto", "diagonal", 4096, 64,
                           overwrite_b=False) == "sequential"
  table["live"]["64"] = 1024
  assert scan.resolve_impl("auto", "diagonal", 2048, 64,
                           overwrite_b=False) == "chunked"
  assert scan.resolve_impl("auto", "block2", 4096, 64) == "sequential"
  assert scan.resolve_impl("auto", "dense", 1 << 16, 64) == "sequential"
  assert scan.resolve_impl("associative", "dense", 5, 64) == "associative"


def test_committed_crossover_table_is_read():
  table = scan.crossover_table()
  assert set(table) == {"overwrite", "live"}
  for entries in table.values():
    assert entries and all(int(c) > 0 and (t is None or t > 0)
                           for c, t in entries.items())


def test_auto_sees_whether_b_is_an_intermediate(monkeypatch):
  """A concrete b is live (its buffer must survive); a traced b is taken
  as an intermediate; `overwrite_b` overrides either."""
  seen = []
  resolve = scan.resolve_impl

  def spy(impl, structure, t, chunk=64, overwrite_b=True, channels=1):
    seen.append(overwrite_b)
    return resolve(impl, structure, t, chunk, overwrite_b, channels)
  monkeypatch.setattr(scan, "resolve_impl", spy)
  a, b, _ = random_system("diagonal", 8, jnp.float32)
  scan.linear_scan(a, b)
  jax.jit(lambda a, b: scan.linear_scan(a, b))(a, b)
  scan.linear_scan(a, b, overwrite_b=True)
  assert seen == [False, True, True]


def test_registered_backend_plugs_in():
  calls = []

  def numpy_backend(a, b, h0, ops, chunk):
    calls.append(ops.name)
    return jnp.asarray(numpy_reference(a, b, h0, ops.name, False), b.dtype)
  scan.register_impl("test-numpy", numpy_backend)
  try:
    a, b, h0 = random_system("dense", 6, jnp.float32)
    out = scan.linear_scan(a, b, h0, structure="dense", impl="test-numpy",
                           reverse=True)
    ref = scan.linear_scan(a, b, h0, structure="dense", impl="sequential",
                           reverse=True)
    assert calls == ["dense"] and rel_error(out, ref) <= 1e-6
  finally:
    del scan._IMPL_FNS["test-numpy"]


@pytest.mark.parametrize("kwargs,shapes,match", [
    (dict(structure="tridiagonal"), ((4, 2, 3), (4, 2, 3)), "structure"),
    (dict(impl="pallas-gpu"), ((4, 2, 3), (4, 2, 3)), "impl"),
    (dict(), ((4, 2, 3), (4, 2, 4)), "does not fit"),
    (dict(structure="dense"), ((4, 2, 3), (4, 2, 3)), "does not fit"),
    (dict(structure="block2"), ((4, 2, 3), (4, 2, 3)), "does not fit"),
    (dict(), ((4,), (4,)), "time-major"),
    (dict(chunk=0), ((4, 2, 3), (4, 2, 3)), "chunk"),
])
def test_bad_input(kwargs, shapes, match):
  a, b = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    scan.linear_scan(a, b, **kwargs)


def test_bad_h0_shape():
  with pytest.raises(ValueError, match="h0"):
    scan.linear_scan(jnp.zeros((4, 2, 3)), jnp.zeros((4, 2, 3)),
                     jnp.zeros((2, 4)))
