"""Decoding programs exported for TPU and GPU on this CPU host (issue 19).

`seqdec.export` lowers the programs `Generator` runs (prefill + the whole
decode while_loop) with `jax.export` for another platform; with
attention_impl='pallas' the tree verification embeds the Pallas kernel
lowered by Mosaic (TPU) or Triton (GPU). Lowering is not compiling: the
device compilers run only on the device (see `seqdec/export.py`). The CPU
round trip (export -> serialize -> deserialize -> call) checks that the
flat calling convention rebuilds the same program: its tokens equal the
jitted loop's on the same inputs.
"""

import jax
import numpy as np
import pytest

from seqdec import Generator, Tokenizer, export, testing
from seqdec.decoding import loops
from seqdec.errors import ConfigError


@pytest.fixture(scope="module")
def model():
  return testing.tiny_model()


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.byte_level()


def _export(model, tok, platform, spec, **kw):
  gen = Generator(export.for_platform(model, platform), tok, spec,
                  max_new_tokens=16)
  return export.export_generator(gen, platform=platform, batch_size=2,
                                 prompt_length=8, **kw)


@pytest.mark.parametrize("platform,call", [
    ("tpu", export.MOSAIC_CALL),
    pytest.param("gpu", export.TRITON_CALL, marks=pytest.mark.slow)])
def test_speculative_programs_lower_with_the_platforms_kernel(
    model, tok, platform, call):
  programs = _export(model, tok, platform, "ngram/kary2x1x1")
  for kind in ("prefill", "decode"):
    exported = programs[kind]
    assert exported.platforms == (export.EXPORT_PLATFORMS[platform],)
    # The verify's tree attention is the device kernel, not interpreted HLO.
    assert export.custom_calls(exported).get(call, 0) >= 1, kind
    back = jax.export.deserialize(exported.serialize())
    assert back.in_avals == exported.in_avals
    assert back.out_avals == exported.out_avals


@pytest.mark.slow
def test_sampled_layer_skip_and_autoregressive_programs_lower_for_tpu(
    model, tok):
  spec = _export(model, tok, "tpu", "layerskip@layers=first:1/kary2x1",
                 temperature=1.0, kinds=("prefill", "step", "live"))
  assert set(spec) == {"prefill", "step", "live"}
  assert export.MOSAIC_CALL in export.custom_calls(spec["step"])
  ar = _export(model, tok, "tpu", "ar")
  # Autoregressive decode steps are one token: the XLA path, no kernel.
  assert export.MOSAIC_CALL not in export.custom_calls(ar["decode"])


@pytest.mark.slow
def test_cpu_round_trip_runs_the_same_program(model, tok):
  """Exported, serialised and deserialised prefill + decode give the
  jitted loop's tokens on the same inputs (Pallas interpreted on CPU)."""
  gen = Generator(export.for_platform(model, "cpu"), tok, "ngram/chain4",
                  max_new_tokens=12, eos_ids=())
  programs = export.export_generator(gen, platform="cpu", batch_size=2,
                                     prompt_length=8)
  loop, inputs = gen.program_inputs(2, 8)
  inputs = inputs.replace(tokens=inputs.tokens.at[:, :6].set(
      np.array([[72, 105, 32, 116, 104, 101], [49, 50, 51, 49, 50, 51]])),
      prompt_len=np.array([6, 6], np.int32))
  params = gen.loop_params
  want = loops.DECODE(loop, params=params, inputs=inputs,
                      state=loops.PREFILL(loop, params=params, inputs=inputs))

  prefill = jax.export.deserialize(programs["prefill"].serialize())
  decode = jax.export.deserialize(programs["decode"].serialize())
  state_tree = jax.tree.structure(jax.eval_shape(
      lambda p, i: loop.prefill(params=p, inputs=i), params, inputs))
  state = jax.tree.unflatten(state_tree, prefill.call(
      *export.flat_arguments(params=params, inputs=inputs)))
  got = jax.tree.unflatten(state_tree, decode.call(
      *export.flat_arguments(params=params, inputs=inputs, state=state)))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.num_new, want.num_new)
  assert int(np.min(got.num_new)) == 12


def test_a_model_left_on_the_host_backend_is_refused(model, tok):
  gen = Generator(model, tok, "ngram/chain4", max_new_tokens=8)
  with pytest.raises(ConfigError, match="for_platform"):
    export.export_generator(gen, platform="tpu")
  with pytest.raises(ConfigError, match="unknown platform 'npu'"):
    export.for_platform(model, "npu")


@pytest.mark.slow
def test_export_cli_writes_deserializable_programs(tmp_path):
  import json
  import subprocess
  import sys
  done = subprocess.run(
      [sys.executable, "launch/export.py",
       "--config=configs/spec_decode.py:runlocal", "--platform=tpu",
       f"--out={tmp_path}", "--batch_size=2", "--prompt_length=16"],
      capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout)
  assert summary["programs"]["decode"]["custom_calls"] == {
      export.MOSAIC_CALL: 1}
  blob = (tmp_path / "decode.bin").read_bytes()
  assert jax.export.deserialize(blob).platforms == ("tpu",)


MESH_EXPORT = """\
import jax
from seqdec import Generator, Tokenizer, export, testing
from seqdec.parallel import sharding
gen = Generator(export.for_platform(testing.tiny_model(), "tpu"),
                Tokenizer.byte_level(), "ngram/chain4", max_new_tokens=16,
                mesh=sharding.make_mesh("data:4,model:2"))
programs = export.export_generator(gen, platform="tpu", batch_size=4,
                                   prompt_length=8)
back = jax.export.deserialize(programs["decode"].serialize())
print("RESULT", back.nr_devices, back.platforms,
      export.custom_calls(back).get(export.MOSAIC_CALL, 0) >= 1,
      any("model" in str(s) for s in back.in_shardings_jax(gen.mesh)))
"""


@pytest.mark.slow
def test_programs_export_for_tpu_on_an_8_device_mesh():
  """On data:4 x model:2 (8 simulated CPU devices), the decode loop exports
  for TPU over 8 devices, its weights split over `model`."""
  line = testing.run_on_devices(MESH_EXPORT)
  assert line == "8 ('tpu',) True True", line
