"""Autoregressive decoding with a pretrained or tiny random model.

Launch:
  python launch/decode.py --config=configs/decode.py --prompt="What is 2+2?"
  python launch/decode.py --config=configs/decode.py:model=smollm2-135m-instruct \
      --config.max_new_tokens=64 --prompts_file=in.jsonl --output=out.jsonl
  python launch/decode.py --config=configs/decode.py:runlocal --prompt="hello"

`model` is a name known to `seqdec.load_pretrained` (smollm2-135m-instruct,
tiny), an HF checkpoint directory, or a .gguf file. `runlocal` swaps in the
tiny random model (byte-level tokenizer) for a CPU smoke run.
"""

import ml_collections

from seqdec import config_utils
from seqdec.decoding.spec import SpecConfig


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, model="smollm2-135m-instruct",
                               runlocal=False)
  c = config_utils.decode_config(arg.model, arg.runlocal)
  c.spec = ml_collections.ConfigDict(SpecConfig().to_config())  # "ar"
  return c
