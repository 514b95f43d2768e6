"""Data-parallel decoding on a device mesh (issue 16, first part; issue 19's
sharded notebook): 8 simulated CPU devices in a subprocess (the device
count is fixed when jax starts), sharded tokens == unsharded tokens."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from seqdec.errors import ConfigError
from seqdec.parallel import sharding

SCRIPT = textwrap.dedent("""\
    import json
    import sys
    import jax
    from seqdec import Generator, Tokenizer, testing
    from seqdec.parallel import sharding
    assert jax.device_count() == 8
    model, tok = testing.tiny_model(), Tokenizer.byte_level()
    prompts = ["abcabcabc", "hello there", "1 2 3 1 2 3", "xyz", "the cat"]
    mesh = sharding.make_mesh()
    out = {}
    cases = {"ar": 0.0, "ngram/chain4": 0.0,
             "layerskip@layers=first:1/kary2x1": 1.0}
    for spec in sys.argv[1:]:
      temperature = cases[spec]
      runs = []
      for m in (None, mesh):
        gen = Generator(model, tok, spec, max_new_tokens=12, eos_ids=(),
                        temperature=temperature, seed=3, mesh=m)
        runs.append([r.tokens for r in gen.generate(prompts)])
      loop, inputs = gen.program_inputs(5, 16)
      out[spec] = dict(same=runs[0] == runs[1], rows=inputs.tokens.shape[0],
                       spec=str(inputs.tokens.sharding.spec))
    print(json.dumps(out))
    """)


def _run(*specs):
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SCRIPT, *specs], env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert set(out) == set(specs)
  for spec, r in out.items():
    assert r["same"], spec
    assert r["rows"] == 8, r          # 5 prompts -> 8 rows: one per device
    assert r["spec"] == str(sharding.PartitionSpec("data")), r


def test_data_parallel_decoding_equals_unsharded():
  _run("ar")


@pytest.mark.slow
def test_data_parallel_speculative_decoding_equals_unsharded():
  _run("ngram/chain4", "layerskip@layers=first:1/kary2x1")


def test_mesh_specs():
  assert sharding.parse_mesh(None, 8) == {"data": 8}
  assert sharding.parse_mesh("data:2,model:4", 8) == {"data": 2, "model": 4}
  assert sharding.parse_mesh("data:-1,model:2", 8) == {"data": 4, "model": 2}
  for spec, match in (("data:3", "does not use the 8 devices"),
                      ("batch:8", "unknown mesh axis 'batch'"),
                      ("data:x", "integer size"),
                      ("data:-1,model:-1", "at most one")):
    with pytest.raises(ConfigError, match=match):
      sharding.parse_mesh(spec, 8)
  with pytest.raises(ConfigError, match="'model' mesh axis"):
    sharding.make_mesh("data:1,model:2", devices=[None, None])
