"""Two processes, one mesh (issue 16): `jax.distributed` on localhost.

Two processes of 4 simulated CPU devices each join a coordinator on
127.0.0.1 (gloo collectives) and decode on the global data:2 x model:4
mesh; both must return the single-process, unsharded tokens. The sharded
parameters they saved with orbax are then restored by one process onto a
different mesh (data:1 x model:8) with identical values. A process whose
peer never comes ends within its timeout with a clear error.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from seqdec import Generator, Tokenizer, testing
from seqdec.errors import ConfigError
from seqdec.parallel import distributed, sharding

PROMPTS = ["abcabcabc", "hello there", "1 2 3 1 2 3", "xyz", "the cat"]
SPECS = ("ngram/chain4",)

WORKER = textwrap.dedent("""\
    import json, sys
    from seqdec.parallel import distributed
    distributed.initialize(timeout_s=int(sys.argv[2]))
    import jax
    import orbax.checkpoint as ocp
    from seqdec import Generator, Tokenizer, testing
    from seqdec.parallel import sharding
    assert (jax.process_count(), jax.device_count(),
            jax.local_device_count()) == (2, 8, 4)
    model, tok = testing.tiny_model(), Tokenizer.byte_level()
    mesh = sharding.make_mesh("data:2,model:4")
    out = {}
    for spec in %r:
      gen = Generator(model, tok, spec, max_new_tokens=12, eos_ids=(),
                      mesh=mesh)
      out[spec] = [r.tokens for r in gen.generate(%r)]
    params = gen.loop_params[0]
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(sys.argv[1], params)
    print("RESULT " + json.dumps(dict(process=jax.process_index(), out=out)))
    """ % (SPECS, PROMPTS))

RESTORE = textwrap.dedent("""\
    import sys
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from seqdec import testing
    from seqdec.parallel import sharding
    model = testing.tiny_model()
    mesh = sharding.make_mesh("data:1,model:8")
    params = nnx.state(model)
    plan = sharding.plan_params(params, mesh)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        sharding.place(params, mesh, plan))
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(sys.argv[1], target)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(restored)}
    print("RESULT", same, len(jax.tree.leaves(restored)), sorted(specs))
    """)


@pytest.mark.slow
def test_two_processes_decode_like_one_and_checkpoint_across_meshes(
    tmp_path):
  ckpt = str(tmp_path / "params")
  outs = distributed.launch_local([sys.executable, "-c", WORKER, ckpt, "120"],
                                  2, timeout_s=900)
  results = [json.loads([ln for ln in out.splitlines()
                         if ln.startswith("RESULT ")][-1][len("RESULT "):])
             for out in outs]
  assert [r["process"] for r in results] == [0, 1]
  model, tok = testing.tiny_model(), Tokenizer.byte_level()
  for spec in SPECS:
    want = [r.tokens for r in Generator(model, tok, spec, max_new_tokens=12,
                                        eos_ids=()).generate(PROMPTS)]
    for r in results:
      assert r["out"][spec] == want, (r["process"], spec)

  line = testing.run_on_devices(RESTORE, ckpt)
  assert line.startswith("True "), line     # values identical
  # ... and laid out for the new mesh: the MLP split 8 ways.
  assert str(sharding.PartitionSpec(None, None, "model")) in line, line


PEER = ("import os, sys, time\n"
        "me = os.environ['SEQDEC_PROCESS_ID']\n"
        "if me == '1' and sys.argv[1] == 'fail': sys.exit(3)\n"
        "if me == '1': time.sleep(600)\n"
        "from seqdec.parallel import distributed\n"
        "distributed.initialize(timeout_s=int(sys.argv[2]))\n")


@pytest.mark.slow
def test_a_peer_that_fails_to_start_ends_the_run_with_a_clear_error():
  with pytest.raises(ConfigError, match="process 1 of 2 exited with status 3"):
    distributed.launch_local([sys.executable, "-c", PEER, "fail", "10"], 2,
                             timeout_s=300)


@pytest.mark.slow
def test_a_hung_run_ends_within_its_timeout():
  t0 = time.monotonic()
  with pytest.raises(ConfigError, match="did not finish within 5 s"):
    distributed.launch_local([sys.executable, "-c", PEER, "hang", "600"], 2,
                             timeout_s=5)
  assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_decode_cli_on_two_processes_writes_once_and_equals_one_device(
    tmp_path):
  """launch/decode.py with --config.mesh over 2 processes x 4 devices:
  process 0 alone writes --output, and its rows equal a one-device run's."""
  args = ["launch/decode.py", "--config=configs/spec_decode.py:runlocal",
          "--prompt=abcabcabc", "--prompt=hello there", "--prompt=xyz"]
  one = tmp_path / "one.jsonl"
  done = subprocess.run([sys.executable, *args, f"--output={one}"],
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  many = tmp_path / "many.jsonl"
  distributed.launch_local(
      [sys.executable, *args, "--config.mesh=data:2,model:4",
       f"--output={many}"], 2, timeout_s=900)
  rows = [[json.loads(ln)["tokens"] for ln in open(p)] for p in (one, many)]
  assert len(rows[0]) == 3 and rows[0] == rows[1]
