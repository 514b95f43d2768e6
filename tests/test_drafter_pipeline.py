"""The drafter training pipeline end to end on tiny targets: the config's
runlocal arm (data built into tensorstore, a few steps, export), resume
after an interruption, and the exported drafter decoding losslessly."""

import importlib.util
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

import seqdec
from seqdec.checkpoints import drafters as drafter_ckpt
from seqdec.data import drafter_prompts, features, responses
from seqdec.generator import Generator
from seqdec.train import drafter as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(arg, tmp_path, name="eagle", **train):
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(ROOT, "configs", "drafters",
                                     f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.data.path = str(tmp_path / "data")
  c.train.update(train)
  return c


def build_data(c, target, tok):
  features.build(c.data.path, target, tok,
                 drafter_prompts.build_prompts(c.data.build_prompts,
                                               max_files=40),
                 meta=dict(model=c.model), max_prompt=48, max_new=16,
                 temperature=0.0, seed=0, chunk=8)


class Interrupt(Exception):
  pass


def stop_after(k):
  """A `progress` hook that lets k steps run, then interrupts the run."""
  def progress(steps, start, total):
    for i, s in enumerate(steps):
      if i == k:
        raise Interrupt
      yield s
  return progress


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-gemma3"])
def test_runlocal_trains_exports_and_decodes_losslessly(tmp_path, model):
  """The runlocal arm: its data (responses + features in tensorstore), its
  steps (checkpointed), the export with a trimmed head; the exported
  drafter decodes exactly as autoregressive decoding (f32, greedy) on a
  Llama-family and a Gemma 3 target."""
  c = config(f"runlocal,model={model}", tmp_path)
  c.data.build_prompts = 16            # two chunks of one shape
  target, tok = seqdec.load_pretrained(c.model)
  build_data(c, target, tok)
  ds = features.FeatureDataset.open(c.data.path, features.fingerprint(target))
  assert ds.rows == c.data.build_prompts
  got = ds.read(np.arange(3))
  want = features.target_features(target, got["tokens"])
  # Stored in bf16 from batches of 8: one bf16 rounding step (2^-8
  # relative) apart at most from a recomputation in another batch shape.
  np.testing.assert_allclose(got["features"].astype(np.float32),
                             want.astype(np.float32), rtol=2 ** -7, atol=0)
  out = trainer.train(c, target, str(tmp_path / "work"))
  assert [r["step"] for r in out["history"] if "loss" in r] == list(
      range(1, c.train.steps + 1))
  assert len(out["keep_ids"]) == c.data.vocab_keep
  # runlocal trains with the training-time test and reports the chain τ.
  assert {"valid_top1_2", "valid_tau2"} <= set(out["eval"])
  assert 1.0 <= out["eval"]["valid_tau2"] <= 3.0
  path = drafter_ckpt.save(str(tmp_path / "drafter"), out["net"], target,
                           dtype="float32", keep_ids=out["keep_ids"])
  # The saved drafter scores as the trained one on the validation rows.
  again = trainer.validate(c, target, *drafter_ckpt.load(path, target))
  for k, v in out["eval"].items():
    assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  prompts = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12]]
  ar = Generator(target, tok, max_new_tokens=10, eos_ids=()).generate_ids(
      prompts)
  spec = Generator(target, tok, f"eagle@checkpoint={path}/kary2x1",
                   max_new_tokens=10, eos_ids=()).generate_ids(prompts)
  assert [r.tokens for r in spec] == [r.tokens for r in ar]


@pytest.mark.slow
def test_every_heads_config_runlocal_trains_and_decodes(tmp_path):
  """The runlocal arms of the heads configs (Medusa, Hydra, ReDrafter) on
  one dataset: each runs its steps (finite losses, weights moved from
  their initialisation; the loss falling on a fixed batch is
  test_medusa's and test_redrafter's), exports with its trimmed head, and
  decodes exactly as autoregressive decoding (f32, greedy) through its
  spec string."""
  target, tok = seqdec.load_pretrained("tiny")
  prompts = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12]]
  ar = Generator(target, tok, max_new_tokens=8, eos_ids=()).generate_ids(
      prompts)
  for name in ("medusa", "hydra", "redrafter"):
    c = config("runlocal", tmp_path, name, eval_every=0)
    c.data.path = str(tmp_path / "data")
    c.data.build_prompts = 16
    if name == "medusa":
      build_data(c, target, tok)
    out = trainer.train(c, target, str(tmp_path / name))
    losses = [r["loss"] for r in out["history"] if "loss" in r]
    assert len(losses) == c.train.steps and np.isfinite(losses).all(), name
    fresh = nnx.state(trainer.build_net(c, target), nnx.Param)
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(fresh), jax.tree.leaves(nnx.state(out["net"],
                                                          nnx.Param)))]
    assert any(moved), name
    path = drafter_ckpt.save(str(tmp_path / f"{name}_drafter"), out["net"],
                             target, dtype="float32",
                             keep_ids=out["keep_ids"])
    spec = Generator(target, tok, f"{name}@checkpoint={path}/kary2x1",
                     max_new_tokens=8, eos_ids=()).generate_ids(prompts)
    assert [r.tokens for r in spec] == [r.tokens for r in ar], name


def test_a_warm_start_continues_from_a_saved_drafter(tmp_path):
  """`train.init_from`: a run starts from a saved drafter's weights (with
  learning rate 0 it ends on them bit for bit, and scores as the saved
  drafter does); a saved network of another shape is refused by name."""
  c = config("runlocal", tmp_path, steps=2, eval_every=0,
             checkpoint_every=0)
  c.data.build_prompts = 8
  target, tok = seqdec.load_pretrained(c.model)
  build_data(c, target, tok)
  first = trainer.train(c, target, str(tmp_path / "first"))
  path = drafter_ckpt.save(str(tmp_path / "drafter"), first["net"], target,
                           dtype="float32", keep_ids=first["keep_ids"])
  warm = config("runlocal", tmp_path, steps=1, eval_every=0,
                checkpoint_every=0, learning_rate=0.0, init_from=path)
  out = trainer.train(warm, target, str(tmp_path / "warm"))
  fresh = nnx.state(trainer.build_net(c, target), nnx.Param)
  saved = nnx.state(drafter_ckpt.load(path, target)[0], nnx.Param)
  got = nnx.state(out["net"], nnx.Param)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(fresh), jax.tree.leaves(saved)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  again = trainer.validate(warm, target, *drafter_ckpt.load(path, target))
  for k, v in out["eval"].items():
    assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  heads = config("runlocal", tmp_path, "hydra", steps=1, eval_every=0,
                 checkpoint_every=0, init_from=path)
  with pytest.raises(trainer.TrainError, match="init_from.*another shape"):
    trainer.train(heads, target, str(tmp_path / "hydra"))


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_repeating_or_skipping(tmp_path):
  """Killed after 3 of 6 steps (checkpoint every 1), a rerun resumes at
  step 3, runs steps 4..6 on the same batches, and ends with the
  parameters and optimizer state of an uninterrupted run, bit for bit."""
  c = config("runlocal", tmp_path, steps=6, checkpoint_every=1, eval_every=0)
  target, tok = seqdec.load_pretrained(c.model)
  build_data(c, target, tok)
  whole = trainer.train(c, target, str(tmp_path / "whole"))
  with pytest.raises(Interrupt):
    trainer.train(c, target, str(tmp_path / "cut"), progress=stop_after(3))
  rest = trainer.train(c, target, str(tmp_path / "cut"))
  assert rest["resumed_from"] == 3
  assert [r["step"] for r in rest["history"] if "loss" in r] == [4, 5, 6]
  losses = {r["step"]: r["loss"] for r in whole["history"] if "loss" in r}
  assert [r["loss"] for r in rest["history"] if "loss" in r] == [
      losses[4], losses[5], losses[6]]
  for a, b in zip(jax.tree.leaves(nnx.state(whole["net"])),
                  jax.tree.leaves(nnx.state(rest["net"]))):
    np.testing.assert_array_equal(a, b)


def test_batches_are_a_function_of_the_step(tmp_path):
  """Rows of step s: slots s*B .. s*B+B-1 of per-epoch permutations of the
  training rows: every row once per epoch, the validation rows never."""
  class Fake:
    rows, path = 13, "fake"
  b = trainer.Batches(Fake(), batch_size=4, positions=8, valid_rows=3,
                      seed=0, response_only=True)
  seen = np.concatenate([b.rows(s) for s in range(5)])       # 2 epochs
  assert sorted(seen[:10]) == list(range(10))
  assert sorted(seen[10:20]) == list(range(10))
  np.testing.assert_array_equal(b.rows(3), trainer.Batches(
      Fake(), 4, 8, 3, 0, True).rows(3))
  assert list(b.valid) == [10, 11, 12]


def test_length_grouped_batches_hold_like_lengths(tmp_path):
  """With data.length_groups, an epoch still holds every training row once,
  in the same order for the same seed, but a batch's rows have like
  lengths: the padding computed (batch width minus row length) falls by
  more than half against random batches."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 400, 200)

  class Fake:
    rows, path = 200, "fake"

    def read(self, rows, names):
      return {"lengths": lengths[rows]}

  def padding(b):
    batches = [b.rows(s) for s in range(b.train_rows // 8)]
    return sum(int((lengths[r].max() - lengths[r]).sum()) for r in batches)

  grouped = trainer.Batches(Fake(), 8, 8, 8, 0, True, length_groups=8)
  plain = trainer.Batches(Fake(), 8, 8, 8, 0, True)
  seen = np.concatenate([grouped.rows(s) for s in range(48)])   # 2 epochs
  assert sorted(seen[:192]) == list(range(192))
  assert sorted(seen[192:]) == list(range(192))
  np.testing.assert_array_equal(grouped.rows(5), trainer.Batches(
      Fake(), 8, 8, 8, 0, True, length_groups=8).rows(5))
  print(f"padding {padding(grouped)} grouped, {padding(plain)} random")
  assert padding(grouped) < 0.5 * padding(plain)


def test_a_length_grouped_build_keeps_prompt_order_and_exact_features(
    tmp_path):
  """Blocks generated in order of prompt length are written in prompt
  order (row i holds prompt i, and its response is what the target writes
  for it alone); features computed by length equal the target's features
  over each row alone (bf16 storage: 1 ulp), zero past the row's end; an
  interrupted build resumes at its next block."""
  target = seqdec.load_pretrained("tiny")[0]
  tok = seqdec.load_pretrained("tiny")[1]
  prompts = drafter_prompts.build_prompts(10, max_files=40)
  kw = dict(meta=dict(model="tiny"), max_prompt=40, max_new=8,
            temperature=0.0, seed=0, chunk=2, group=3)
  path = str(tmp_path / "d")

  def stop(msg):
    raise Interrupt(msg)
  with pytest.raises(Interrupt, match="chunks 3/5"):
    features.build(path, target, tok, prompts, log=stop, **kw)
  assert features.FeatureDataset.open(path).rows == 6
  logs = []
  features.build(path, target, tok, prompts, log=logs.append, **kw)
  assert len(logs) == 1 and logs[0].startswith("chunks 5/5: rows 6..9")
  ds = features.FeatureDataset.open(path)
  got = ds.read(np.arange(10))
  gen = Generator(target, tok, max_new_tokens=8)
  for i, (_, text) in enumerate(prompts):
    ids = gen.encode([{"role": "user", "content": text}])[:40] if (
        tok.chat_template) else gen.encode(text)[:40]
    n, p = int(got["lengths"][i]), int(got["prompt_lens"][i])
    assert got["tokens"][i, :p].tolist() == list(ids)
    alone = gen.generate_ids([ids])[0].tokens
    assert got["tokens"][i, p:n].tolist() == list(alone)
    want = features.target_features(target, got["tokens"][i:i + 1, :n])[0]
    np.testing.assert_allclose(got["features"][i, :n].astype(np.float32),
                               want.astype(np.float32), rtol=1e-2,
                               atol=1e-2)
    assert not got["features"][i, n:].astype(np.float32).any()


def test_a_response_store_rebuilds_a_dataset_without_generating(tmp_path):
  """A build's responses saved as a response store and reused by a build
  into a new directory give the same rows (tokens and features); the rows
  the store holds are not generated (the log counts them), the others are.
  Another recipe, a changed prompt, a corrupt or a missing store is refused
  with an error naming it."""
  target, tok = seqdec.load_pretrained("tiny")
  prompts = drafter_prompts.build_prompts(6, max_files=40)
  kw = dict(meta=dict(model="tiny"), max_prompt=40, max_new=8,
            temperature=0.0, seed=0, chunk=2)
  first = features.build(str(tmp_path / "a"), target, tok, prompts[:4], **kw)
  path = str(tmp_path / "r.npz")
  assert features.export_responses(first, path) == 4
  store = responses.ResponseStore.open(path)
  logs = []
  second = features.build(str(tmp_path / "b"), target, tok, prompts,
                          responses=store, log=logs.append, **kw)
  assert [int(re.search(r"\((\d+) rows from the response store", m)[1])
           for m in logs] == [2, 2, 0]
  a, b = first.read(np.arange(4)), second.read(np.arange(6))
  for name in features.ARRAYS:
    np.testing.assert_array_equal(np.asarray(b[name][:4], np.float32),
                                  np.asarray(a[name], np.float32), name)
  assert (b["lengths"][4:] > b["prompt_lens"][4:]).all()   # generated
  # The same responses with EAGLE-3's fused features (taps): the tokens as
  # stored, the features [n(input of block 1) ; f], f as before.
  fused = features.build(str(tmp_path / "e"), target, tok, prompts[:4],
                         responses=store, taps=(1,), **kw).read(np.arange(4))
  d = target.config.hidden_size
  assert fused["features"].shape[-1] == 2 * d
  np.testing.assert_array_equal(fused["tokens"], a["tokens"])
  np.testing.assert_array_equal(fused["features"][..., d:], a["features"])
  assert np.abs(fused["features"][..., :d].astype(np.float32)).max() > 0.1

  with pytest.raises(responses.ResponseStoreError, match=r"\['max_new'\]"):
    features.build(str(tmp_path / "c"), target, tok, prompts, responses=store,
                   **dict(kw, max_new=6))
  changed = list(prompts)
  changed[1] = (changed[1][0], "Be brief. " + changed[1][1])  # (cut at 40)
  with pytest.raises(responses.ResponseStoreError, match="prompt 1 differs"):
    features.build(str(tmp_path / "d"), target, tok, changed,
                   responses=store, **kw)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(open(path, "rb").read()[:100])
  with pytest.raises(responses.ResponseStoreError, match="bad.npz"):
    responses.ResponseStore.open(str(bad))
  with pytest.raises(responses.ResponseStoreError, match="does not exist"):
    responses.ResponseStore.open(str(tmp_path / "none.npz"))


def test_sampled_positions_stay_in_the_response():
  rngs = [np.random.default_rng([0, i]) for i in range(2)]
  index, weight = trainer.sample_positions(
      rngs, lengths=np.array([20, 6]), prompt_lens=np.array([12, 5]),
      seq_len=24, k=8, response_only=True)
  t = index + 1                                     # positions t
  assert weight[0].sum() == 8 and len(set(t[0])) == 8   # distinct
  assert ((t[0] >= 11) & (t[0] <= 19)).all()          # P-1 .. n-1
  assert weight[1].sum() == 2 and sorted(t[1][:2]) == [4, 5]


@pytest.mark.parametrize("script,args,fragment", [
    ("train_drafter.py", ["--config=configs/drafters/eagle.py:model=tiny",
                          "--config.data.path=/nonexistent/data"],
     "no drafter dataset at '/nonexistent/data' (missing meta.json)"),
    ("make_drafter_data.py", ["--model=tiny", "--num_prompts=0"],
     "--out is required"),
    pytest.param("make_drafter_data.py", [
        "--model=tiny", "--out=/nonexistent/d", "--export_only"],
                 "--export_only needs --save_responses",
                 marks=pytest.mark.slow),
    pytest.param("make_drafter_data.py", [
        "--model=tiny", "--num_prompts=2", "--nodebian_text",
        "--out=/nonexistent/d", "--responses=/nonexistent/r.npz"],
                 "response store '/nonexistent/r.npz' does not exist",
                 marks=pytest.mark.slow),
    ("train_drafter.py", ["--config=configs/drafters/eagle.py:model=tiny",
                          "--evaluate=/nonexistent/drafter"],
     "/nonexistent/drafter"),
])
def test_bad_input_through_the_scripts(tmp_path, script, args, fragment):
  """A missing dataset or bad flags: one `error:` line naming the problem,
  exit status 1, nothing written."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if script == "train_drafter.py":
    args = args + [f"--workdir={tmp_path / 'w'}"]
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script),
                      *args], capture_output=True, text=True, cwd=ROOT,
                     timeout=300, check=False)
  assert r.returncode == 1, r.stderr[-2000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert errors and fragment in errors[-1], r.stderr[-2000:]
  assert not (tmp_path / "w" / "drafter").exists()
