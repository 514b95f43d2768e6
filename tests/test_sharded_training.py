"""Training on a device mesh (issue 16): the trainers run data- and
tensor-parallel and give the one-device run.

Oracle: the same config with `mesh=''` on one device. In float64 the
sharded run's losses equal it to 1e-10 and its final parameters to
Adam's roundoff amplification (`ADAM_ATOL`; only the order of a few sums
differs): the ParaGRU language model and the EAGLE drafter on one process
with 8 simulated devices, and the EAGLE drafter on two processes with 4
devices each, where each process loads only its own rows of every batch.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from seqdec import testing
from seqdec.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Builds the drafter dataset of the float64 tiny target (one process).
BUILD = textwrap.dedent("""\
    import sys
    from seqdec import testing, Tokenizer
    from seqdec.data import drafter_prompts, features
    features.build(sys.argv[1], testing.tiny_model("float64"),
                   Tokenizer.byte_level(),
                   drafter_prompts.build_prompts(16, max_files=40),
                   meta=dict(model="tiny-f64"), max_prompt=32, max_new=12,
                   temperature=0.0, seed=0, chunk=8)
    print("RESULT ok")
    """)

# Trains both trainers for a few steps on `mesh`, resuming from `workdir`'s
# checkpoint when `steps` grows; writes losses and final parameters.
TRAIN = textwrap.dedent("""\
    import json, os, sys
    args = json.loads(sys.argv[1])
    from seqdec.parallel import distributed
    if args["processes"] > 1:
      distributed.initialize(timeout_s=300)
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from seqdec import config_utils, testing
    from seqdec.data import features
    from seqdec.train import drafter as trainer, lm
    root = args["root"]
    reads = []                        # rows of each features read
    read = features.FeatureDataset.read
    def spy(ds, rows, names=features.ARRAYS):
      if "features" in names:
        reads.append(len(rows))
      return read(ds, rows, names)
    features.FeatureDataset.read = spy
    out = {}
    for kind in args["kinds"]:
      if kind == "lm":
        c = config_utils.load_config(root + "/configs/pararnn_lm.py:runlocal")
        c.model.param_dtype = "float64"
        # Newton stops at this relative residual: near float64's roundoff,
        # so the two runs' solves agree to it, not to the default 1e-6.
        c.model.tol = 1e-12
      else:
        c = config_utils.load_config(root + "/configs/drafters/eagle.py:runlocal")
        c.data.path = args["data"]
        c.data.valid_rows = 4
      c.mesh = args["mesh"]
      c.train.update(steps=args["steps"], checkpoint_every=1, eval_every=0)
      workdir = os.path.join(args["workdir"], kind)
      if kind == "lm":
        res = lm.train(c, workdir)
        params = res["params"]
      else:
        res = trainer.train(c, testing.tiny_model("float64"), workdir)
        from flax import nnx
        params = nnx.state(res["net"], nnx.Param)
      leaves = [distributed.to_host(x) for x in jax.tree.leaves(params)]
      if jax.process_index() == 0:
        np.savez(os.path.join(args["workdir"], kind + "_params.npz"), *leaves)
      out[kind] = dict(
          losses=[r["loss"] for r in res["history"] if "loss" in r],
          resumed_from=res["resumed_from"],
          specs=sorted({str(getattr(x.sharding, "spec", "one device"))
                        for x in jax.tree.leaves(params)}))
    out["reads"] = reads
    out["process"] = jax.process_index()
    print("RESULT " + json.dumps(out))
    """)


def train(tmp_path, name, data, mesh, steps, processes=1,
          kinds=("lm", "eagle")):
  workdir = tmp_path / name
  workdir.mkdir(exist_ok=True)
  args = json.dumps(dict(root=ROOT, data=data, mesh=mesh, steps=steps,
                         workdir=str(workdir), processes=processes,
                         kinds=list(kinds)))
  if processes == 1:
    rows = [testing.run_on_devices(TRAIN, args, x64=True, optimize=False)]
  else:
    outs = distributed.launch_local([sys.executable, "-c", TRAIN, args],
                                    processes, timeout_s=900)
    rows = [[ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][
        len("RESULT "):] for out in outs]
  results = [json.loads(r) for r in rows]
  params = {k: np.load(workdir / f"{k}_params.npz") for k in kinds}
  return results, params


# Parameters: Adam's update lr * g / (|g| + eps) turns a roundoff-level
# difference dg of a gradient component much smaller than eps into a
# parameter difference lr * dg / eps. A gradient sums N ~ 256 terms per
# batch (4 rows x 64 positions), so dg <= N * 2^-53 * O(1) ~ 3e-14, and with
# lr = 3e-3, eps = 1e-8 over 3 steps the parameters may differ by up to
# 3 * 3e-3 * 3e-14 / 1e-8 ~ 3e-8 (a wrong row or gradient scale shows up
# at ~lr = 3e-3). Losses carry no such amplification: 1e-10 relative.
ADAM_ATOL = 3e-8


def assert_same_run(got, want, got_params, want_params,
                    kinds=("lm", "eagle")):
  for kind in kinds:
    np.testing.assert_allclose(got[kind]["losses"], want[kind]["losses"],
                               rtol=1e-10, atol=0, err_msg=kind)
    a, b = got_params[kind], want_params[kind]
    assert len(a.files) == len(b.files) > 0
    for f in a.files:
      np.testing.assert_allclose(a[f], b[f], rtol=1e-10, atol=ADAM_ATOL,
                                 err_msg=f"{kind} {f}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("drafter_data") / "tiny64")
  assert testing.run_on_devices(BUILD, path, devices=1, x64=True) == "ok"
  return path


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data):
  """The oracle: 3 steps on one device (one process)."""
  return train(tmp_path_factory.mktemp("one"), "run", data, "", 3)


@pytest.mark.slow
def test_training_on_data4_model2_equals_one_device(tmp_path, data,
                                                   one_device):
  """Rows over data:4, the drafter's MLP and heads over model:2."""
  [got], params = train(tmp_path, "run", data, "data:4,model:2", 3)
  [want], want_params = one_device
  assert_same_run(got, want, params, want_params)
  # The drafter's decoder layer is split over `model`; the RNN LM's
  # parameters carry no logical axes and are replicated.
  assert any("model" in s for s in got["eagle"]["specs"])
  assert got["lm"]["specs"] == [str(PartitionSpec())]
  # Validation (4 rows: sampled positions, then every position for the
  # chain τ replay), then 3 steps of 4 rows: one process reads every row
  # of the batch.
  assert got["reads"] == [4, 4, 4, 4, 4]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, data, one_device):
  """2 processes x 4 devices on data:2 x model:4 train the EAGLE drafter:
  each process reads only its 2 of the 4 rows of every training batch, and
  the run ends where the one-device run does (orbax saves and restores
  across processes and meshes: test_multihost.py; a resumed run:
  test_drafter_pipeline.py)."""
  got, params = train(tmp_path, "run", data, "data:2,model:4", 3,
                      processes=2, kinds=("eagle",))
  [want], want_params = one_device
  assert [r["process"] for r in got] == [0, 1]
  for r in got:
    # validation: all 4 rows (sampled positions, then every position for
    # the chain τ replay); then 3 training steps of 2 rows each.
    assert r["reads"] == [4, 4, 2, 2, 2], r
  assert got[0]["eagle"]["losses"] == got[1]["eagle"]["losses"]
  assert_same_run(got[0], want, params, want_params, kinds=("eagle",))
