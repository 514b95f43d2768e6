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

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2-135m-instruct", runlocal=False)
  c = ml_collections.ConfigDict()
  c.model = "tiny" if arg.runlocal else arg.model
  c.dtype = "float32"          # bfloat16 on accelerators; f32 on CPU
  c.max_new_tokens = 16 if arg.runlocal else 128
  c.temperature = 0.0          # 0 = greedy
  c.top_k = 0                  # 0 = off
  c.top_p = 1.0                # 1 = off
  c.seed = 0
  c.chat = True                # render prompts with the chat template
  c.system_prompt = ""         # prepended as a system message when chatting
  c.max_batch = 8
  c.stream = True              # stream text when decoding a single prompt
  c.default_prompt = ("Explain in three sentences why the sky is blue, for a "
                      "ten-year-old.")
  return c
