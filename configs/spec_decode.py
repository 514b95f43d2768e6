"""Speculative decoding: a drafter proposes a token tree, the target verifies it.

Launch:
  python launch/decode.py --config=configs/spec_decode.py --config.precision=auto
  python launch/decode.py --config=configs/spec_decode.py:spec=ngram/chain4
  python launch/decode.py --config=configs/spec_decode.py:spec=layerskip@layers=skip:8-23/kary2x2
  python launch/decode.py --config=configs/spec_decode.py:spec=draft@draft_layers=10/static6
  python launch/decode.py --config=configs/spec_decode.py:spec=layerskip@layers=skip:4-15@proposal=wor/kary2x1,temperature=1
  python launch/decode.py --config=configs/spec_decode.py:runlocal --prompt=hello
  python launch/decode.py --config=configs/spec_decode.py --config.spec.tree=chain6

`spec` is a method of the one grammar (`seqdec.decoding.spec`):
`<drafter>[@key=value...]/<tree>` or `ar`. It fills the nested `config.spec`
block (drafter, tree, rule, proposal, max_top_k, options), which
`--config.spec.<field>=...` overrides like any other key.

drafter: 'eagle' (the shipped or a trained EAGLE drafter; options
  checkpoint, trim, lookup = a prompt-lookup chain merged into its trees,
  lookup_ngram), 'medusa' | 'hydra' | 'redrafter' (likewise), 'ngram'
  (prompt lookup over prompt + output; options max_ngram,
  min_ngram), 'layerskip' (the target with a subset of its layers: `layers`
  = first:K | skip:a-b[+c-d] | keep:a-b | every:K), 'draft' (an independent
  draft LM: `draft_model` names one like `model` does, or `draft_layers=K`
  truncates the target to K layers).
tree: chain<g> | kary<b1>x<b2>... | static<n> (6, 10, 16) | paths:0-1-0.0-...
  | sequoia<n>[d<D>]:<acceptance.json> | dyn<N>d<D>k<K> (grown on device
  by a trained drafter) | beam<W>x<D>
rule: 'auto' (greedy when every row is at temperature 0, else sample),
  'greedy', 'sample' (lossless speculative sampling at any temperature /
  top-k / top-p), 'typical_lossy' (Medusa's typical acceptance: NOT the
  target distribution).
proposal: model drafters at temperature > 0: 'topk' (deterministic), 'iid'
  (children drawn i.i.d. from the draft distribution), 'wor' (without
  replacement, Gumbel-top-k).
compare_ar: also decode autoregressively, then print the speedup and whether
  the outputs agree.
"""

import ml_collections

from seqdec import config_utils
from seqdec.decoding.spec import SpecConfig


# The default method of a model with a shipped drafter
# (seqdec/checkpoints/shipped): its EAGLE drafter's dynamic tree with a
# 4-token prompt-lookup chain merged in (README, "Prompt lookup inside the
# drafter's tree"); other models (and runlocal's tiny one) decode with
# prompt lookup alone.
SHIPPED_SPEC = {"smollm2-135m-instruct": "eagle@lookup=4/dyn6d3k2"}
FALLBACK_SPEC = "ngram/chain4"


def get_config(arg=None):
  arg = config_utils.parse_arg(
      arg, model="smollm2-135m-instruct", runlocal=False, spec="",
      temperature=0.0, compare_ar=True)
  if not arg.spec:
    arg.spec = (FALLBACK_SPEC if arg.runlocal
                else SHIPPED_SPEC.get(arg.model, FALLBACK_SPEC))
  c = config_utils.decode_config(arg.model, arg.runlocal)
  c.temperature = float(arg.temperature)
  c.spec = ml_collections.ConfigDict(
      SpecConfig.parse(arg.spec).to_config())
  c.compare_ar = arg.compare_ar
  # An input-copying task, where prompt lookup shines (the bench covers all
  # categories: benchmarks/results/spec.md).
  c.default_prompt = (
      "Rewrite the following text in the past tense. Change nothing else.\n\n"
      "Every morning, the baker opens the shop at six o'clock. She turns on "
      "the ovens, takes the dough out of the fridge, and shapes the first "
      "loaves while the radio plays quietly in the corner. By seven, the smell "
      "of fresh bread reaches the street, and the first customers start to "
      "arrive.")
  return c
