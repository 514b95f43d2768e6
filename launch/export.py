"""Exports the decoding programs of a decode config for TPU or GPU.

  python launch/export.py --config=configs/spec_decode.py --platform=tpu \\
      --out=/tmp/smollm2_tpu
  python launch/export.py --config=configs/decode.py:runlocal --platform=gpu \\
      --out=/tmp/tiny_gpu --batch_size=4 --prompt_length=64

Loads the config's model (and drafter), configures it for --platform
(`seqdec.export.for_platform`: Pallas tree-attention kernel, Mosaic on TPU,
Triton on GPU), and exports prefill and the decode loop of one shape bucket
with `jax.export`, on this host, without the device. Writes
<out>/<kind>.bin (`Exported.serialize()`: `jax.export.deserialize` loads
it on the device) and prints a JSON summary: platforms, input/output
shapes, custom calls (the kernels), StableHLO size. Lowering is not
compiling: the device's compilers run there (`seqdec/export.py`).
"""

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from seqdec import cli
from seqdec.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/spec_decode.py", "Decoding config file.",
    lock_config=True)
_PLATFORM = flags.DEFINE_enum("platform", "tpu", ["tpu", "gpu", "cpu"],
                              "Platform to lower for.")
_OUT = flags.DEFINE_string("out", None, "Directory for the programs.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows of the bucket.")
_PROMPT = flags.DEFINE_integer("prompt_length", 64, "Prompt tokens.")
_STREAM = flags.DEFINE_bool("streaming", False,
                            "Export prefill/step/live instead of the loop.")


def run() -> dict:
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec import app as app_lib
  from seqdec import export
  # pylint: enable=g-import-not-at-top
  if not _OUT.value:
    raise UserError("--out is required")
  if _BATCH.value < 1 or _PROMPT.value < 1:
    raise UserError("--batch_size and --prompt_length must be >= 1")
  config = _CONFIG.value
  t0 = time.perf_counter()
  model, tokenizer = seqdec.load_pretrained(config.model, dtype=config.dtype)
  gen = app_lib.make_generator(
      config, export.for_platform(model, _PLATFORM.value), tokenizer)
  kinds = (("prefill", "step", "live") if _STREAM.value
           else ("prefill", "decode"))
  programs = export.export_generator(
      gen, platform=_PLATFORM.value, batch_size=_BATCH.value,
      prompt_length=_PROMPT.value, kinds=kinds)
  os.makedirs(_OUT.value, exist_ok=True)
  summary = dict(model=config.model, spec=str(gen.spec),
                 platform=_PLATFORM.value, programs={})
  for kind, exported in programs.items():
    blob = exported.serialize()
    with open(os.path.join(_OUT.value, f"{kind}.bin"), "wb") as f:
      f.write(blob)
    summary["programs"][kind] = dict(
        platforms=list(exported.platforms),
        inputs=len(exported.in_avals), outputs=len(exported.out_avals),
        custom_calls=export.custom_calls(exported),
        stablehlo_chars=len(exported.mlir_module()), serialized_bytes=len(blob))
  summary["seconds"] = round(time.perf_counter() - t0, 1)
  return summary


main = cli.json_main(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
