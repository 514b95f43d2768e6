"""RNN LM training: corpus order, config, CLI smoke run, resume, equivalence.

Training equivalence (the DEER claim): the same ParaGRU LM trained with the
parallel Newton solver and with the sequential scan, same seed and data
order, gives the same loss curve to within the spread between float32 and
float64 sequential runs of the same training; in float64 the two agree to
1e-8.
"""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from seqdec import config_utils
from seqdec.data import stdlib_corpus
from seqdec.train import lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pararnn_lm.py")


def run_cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_config(**model):
  c = config_utils.load_config(CONFIG + ":runlocal")
  c.train.checkpoint_every = 0
  c.model.update(model)
  return c


# --- corpus -------------------------------------------------------------------


def test_corpus_files_sorted_without_site_packages():
  files = stdlib_corpus.stdlib_files()
  assert files == sorted(files) and len(files) > 100
  assert not any("site-packages" in p.parts for p in files)
  assert stdlib_corpus.stdlib_files(5) == files[:5]


def test_batches_are_a_function_of_seed_and_step():
  corpus = stdlib_corpus.Corpus.load(max_files=10)
  a = corpus.train_batch(0, 7, 4, 32)
  corpus.train_batch(0, 3, 4, 32)  # other calls in between change nothing
  assert np.array_equal(a, corpus.train_batch(0, 7, 4, 32))
  assert not np.array_equal(a, corpus.train_batch(0, 8, 4, 32))
  assert not np.array_equal(a, corpus.train_batch(1, 7, 4, 32))
  assert a.shape == (4, 33) and a.dtype == np.int32
  v = corpus.valid_batches(3, 2, 16)
  assert v.shape == (3, 2, 17)
  assert np.array_equal(v, corpus.valid_batches(3, 2, 16))
  # Files are NUL-separated; source text itself has no NUL byte.
  assert np.sum(corpus.train == 0) + np.sum(corpus.valid == 0) == 10


# --- config and CLI -----------------------------------------------------------


def test_config_locks_and_is_strict():
  for arg in (None, "runlocal", "cell=paralstm,mode=sequential"):
    c = config_utils.load_config(CONFIG + (f":{arg}" if arg else ""))
    c.lock()
    with pytest.raises(AttributeError):
      c.train.no_such_key = 1
    lm.model_config(c.model)
  with pytest.raises(ValueError, match="unknown config argument"):
    config_utils.load_config(CONFIG + ":cells=gru")
  with pytest.raises(lm.TrainError, match="unknown cell"):
    lm.model_config(tiny_config(cell="lstm").model)


@pytest.mark.slow          # CI time
def test_cli_runlocal_smoke_and_resume(tmp_path):
  work = str(tmp_path / "run")
  proc = run_cli("--config=configs/pararnn_lm.py:runlocal", f"--workdir={work}",
                 "--noprogress")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 6 and summary["resumed_from"] == 0
  assert 0 < summary["summary"]["valid_loss"] < np.log(256) + 1
  rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
  assert all(r["newton_failed"] == 0 for r in rows if "loss" in r)
  assert os.path.isdir(os.path.join(work, "checkpoints", "6"))
  # An unknown key: one error line, exit 1 (a checkpoint of another model:
  # test_resume_continues_exactly).
  proc = run_cli("--config=configs/pararnn_lm.py:runlocal",
                 f"--workdir={work}", "--noprogress", "--config.train.stepz=3")
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 1 and lines[-1].startswith("error: "), lines
  assert "unknown config key 'stepz'" in lines[-1]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
  """Interrupted after 2 of 4 steps and resumed == 4 uninterrupted steps;
  a checkpoint of another model is refused."""
  c = tiny_config()
  c.train.steps, c.train.checkpoint_every = 4, 1
  full = lm.train(c, str(tmp_path / "a"))
  first = lm.train(c, str(tmp_path / "b"),
                   progress=lambda steps, s, t: itertools.islice(steps, 2))
  assert [r["step"] for r in first["history"]] == [1, 2]
  rest = lm.train(c, str(tmp_path / "b"))
  assert rest["resumed_from"] == 2
  losses = [r["loss"] for r in first["history"] + rest["history"]]
  assert losses == [r["loss"] for r in full["history"]]
  for a, b in zip(jax.tree.leaves(full["params"]),
                  jax.tree.leaves(rest["params"])):
    np.testing.assert_array_equal(a, b)
  c.model.dim = 8  # the checkpoint belongs to another model: a clear error
  with pytest.raises(lm.TrainError, match="does not match this config"):
    lm.train(c, str(tmp_path / "b"))


# --- training equivalence -----------------------------------------------------


def losses(config, workdir):
  return np.array([r["loss"] for r in lm.train(config, workdir)["history"]])


@pytest.mark.slow
def test_training_equivalence_within_f32_f64_spread(tmp_path):
  steps = 50

  def config(mode, dtype):
    c = tiny_config(mode=mode, param_dtype=dtype)
    c.train.steps = steps
    return c
  par32 = losses(config("parallel", "float32"), str(tmp_path / "p32"))
  seq32 = losses(config("sequential", "float32"), str(tmp_path / "s32"))
  jax.config.update("jax_enable_x64", True)
  try:
    seq64 = losses(config("sequential", "float64"), str(tmp_path / "s64"))
  finally:
    jax.config.update("jax_enable_x64", False)
  par_gap = np.abs(par32 - seq32)
  spread = np.abs(seq32 - seq64)
  print(f"{steps} steps: loss {seq64[0]:.3f} -> {seq64[-1]:.3f}; "
        f"max|par32 - seq32| {par_gap.max():.2e}, "
        f"max|seq32 - seq64| {spread.max():.2e}")
  assert seq64[-1] < seq64[0] - 0.5  # it trains
  assert par_gap.max() <= spread.max()


@pytest.mark.slow
def test_training_equivalence_f64(x64, tmp_path):
  def config(mode):
    c = tiny_config(mode=mode, param_dtype="float64", tol=1e-12, max_iter=64)
    c.train.steps = 8
    return c
  par = losses(config("parallel"), str(tmp_path / "p"))
  seq = losses(config("sequential"), str(tmp_path / "s"))
  print(f"f64: max|par - seq| over 8 steps {np.abs(par - seq).max():.2e}")
  assert np.abs(par - seq).max() <= 1e-8
