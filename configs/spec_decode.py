"""Speculative decoding: a drafter proposes a token tree, the target verifies it.

Launch:
  python launch/decode.py --config=configs/spec_decode.py
  python launch/decode.py --config=configs/spec_decode.py:drafter=ngram,tree=chain4
  python launch/decode.py --config=configs/spec_decode.py:drafter=layerskip,layers=skip:8-23,tree=kary2x2
  python launch/decode.py --config=configs/spec_decode.py:drafter=draft,draft_layers=10,tree=static6
  python launch/decode.py --config=configs/spec_decode.py:runlocal --prompt=hello

drafter: 'ngram' (prompt lookup over prompt + output), 'layerskip' (the target
  with a subset of its layers, `layers` = first:K | skip:a-b[+c-d] |
  keep:a-b | every:K), 'draft' (an independent draft LM: `draft_model` names
  one like `model` does, or `draft_layers=K` truncates the target to K layers).
tree: chain<g> | kary<b1>x<b2>... | static<n> (6, 10, 16) | paths:0-1-0.0-...
rule: 'auto' (greedy at temperature 0, else sample), 'greedy' (temperature
  0; the output equals autoregressive decoding), 'sample' (lossless
  speculative sampling at any temperature / top-k / top-p, matched to how the
  drafter proposed each node's children), 'typical_lossy' (Medusa's typical
  acceptance: NOT the target distribution).
proposal: model drafters at temperature > 0: 'topk' (deterministic), 'iid'
  (children drawn i.i.d. from the draft distribution), 'wor' (without
  replacement, Gumbel-top-k).
temperature: sampling temperature (0 = greedy), e.g.
  --config=configs/spec_decode.py:drafter=layerskip,layers=skip:4-15,temperature=1,proposal=wor,tree=kary2x1
compare_ar: also decode autoregressively, then print the speedup and whether
  the outputs agree.
"""

import ml_collections

from configs import common
from configs import decode


def get_config(arg=None):
  arg = common.parse_arg(
      arg, model="smollm2-135m-instruct", runlocal=False, drafter="ngram",
      tree="chain4", layers="", draft_layers=0, draft_model="", compare_ar=True,
      rule="auto", proposal="topk", temperature=0.0)
  c = decode.get_config("runlocal" if arg.runlocal else f"model={arg.model}")
  c.drafter = arg.drafter
  c.tree = arg.tree
  c.rule = arg.rule
  c.proposal = arg.proposal
  c.temperature = float(arg.temperature)
  c.max_ngram = 3              # n-gram drafter: longest suffix matched
  c.min_ngram = 1              # ... and shortest
  c.layers = arg.layers        # layerskip drafter: layer subset spec
  c.draft_model = arg.draft_model   # draft drafter: a model name/path
  c.draft_layers = arg.draft_layers  # draft drafter: or the target truncated
  c.compare_ar = arg.compare_ar
  # An input-copying task, where prompt lookup shines (the bench covers all
  # categories: bench_results/spec.md).
  c.default_prompt = (
      "Rewrite the following text in the past tense. Change nothing else.\n\n"
      "Every morning, the baker opens the shop at six o'clock. She turns on "
      "the ovens, takes the dough out of the fridge, and shapes the first "
      "loaves while the radio plays quietly in the corner. By seven, the smell "
      "of fresh bread reaches the street, and the first customers start to "
      "arrive.")
  return c
