"""Drafters, chosen by config name.

    make_drafter("ngram", target, max_n=3)
    make_drafter("layerskip", target, layers="skip:10-20")
    make_drafter("draft", target, draft_model=small_model)
    make_drafter("draft", target, draft_layers=8)   # target truncated to 8
    make_drafter("eagle", target, eagle_net=net)    # a trained EagleNet
    make_drafter("medusa", target, eagle_net=heads) # trained MedusaHeads
    make_drafter("redrafter", target, eagle_net=head) # a ReDrafterHead
    WithLookupChain(make_drafter("eagle", ...), 4)  # + a prompt-lookup chain
"""

from __future__ import annotations

from typing import Optional, Union

from seqdec.decoding.drafters.base import (Drafter, DrafterError, Outcome,
                                           Round)
from seqdec.decoding.drafters.eagle import EagleDrafter
from seqdec.decoding.drafters.hydra import HydraDrafter
from seqdec.decoding.drafters.lookup import WithLookupChain, merge_chain
from seqdec.decoding.drafters.medusa import MedusaDrafter
from seqdec.decoding.drafters.grow import PROPOSALS
from seqdec.decoding.drafters.model import (ModelDrafter,
                                            draft_lm, layer_skip,
                                            parse_layers, truncated)
from seqdec.decoding.drafters.ngram import NgramDrafter
from seqdec.decoding.drafters.redrafter import ReDrafterDrafter

# Drafters with a trained network on the target's features, by name.
TRAINED = {"eagle": EagleDrafter, "medusa": MedusaDrafter,
           "hydra": HydraDrafter, "redrafter": ReDrafterDrafter}
DRAFTERS = ("ngram", "layerskip", "draft") + tuple(TRAINED)


def make_drafter(name: str, target, *, max_ngram: int = 3,
                 min_ngram: int = 1, layers: str = "",
                 draft_model=None, draft_layers: int = 0,
                 eagle_net=None, keep_ids=None,
                 proposal: str = "topk", confidence=None,
                 adapt: float = 0.0) -> Drafter:
  """A drafter by name.

  Args:
    name: 'ngram' (prompt lookup), 'layerskip' (target with a layer subset,
      `layers` spec, see `parse_layers`), 'draft' (an independent draft LM:
      `draft_model`, or the target truncated to its first `draft_layers`
      blocks with an own cache), 'eagle' (a trained `EagleNet`,
      `eagle_net`, on the target's features; `keep_ids` its trimmed
      head's vocabulary or None), 'medusa' (trained `MedusaHeads` as
      `eagle_net`, likewise), 'hydra' (trained `HydraHeads`, likewise),
      'redrafter' (a trained `ReDrafterHead`, likewise).
    target: the target `Transformer`.
    proposal: model drafters at temperature > 0: 'topk' (deterministic),
      'iid' (i.i.d. draws from q) or 'wor' (Gumbel-top-k, without
      replacement); the n-gram drafter is always deterministic.
    confidence, adapt: the n-gram's per-match-length chain acceptance and
      how many rounds of prior it weighs (`NgramDrafter`), or None.
  """
  if name == "ngram":
    if proposal != "topk":
      raise DrafterError(f"the n-gram drafter proposes deterministically; "
                         f"proposal={proposal!r} needs a model drafter")
    return NgramDrafter(max_ngram, min_ngram, confidence=confidence,
                        adapt=adapt)
  if name == "layerskip":
    if not layers:
      raise DrafterError("drafter 'layerskip' needs a layer spec, e.g. "
                         "layers=skip:10-20 or layers=first:8")
    return layer_skip(target, parse_layers(layers, target.config.num_layers),
                      proposal=proposal)
  if name == "draft":
    if draft_model is None and not draft_layers:
      raise DrafterError("drafter 'draft' needs a draft model (draft_model=...)"
                         " or draft_layers=K to truncate the target")
    if draft_model is None:
      draft_model = truncated(target, draft_layers)
    return draft_lm(draft_model, proposal=proposal)
  if name in TRAINED:
    if eagle_net is None:
      raise DrafterError(f"drafter {name!r} needs its trained network "
                         f"(eagle_net=...)")
    return TRAINED[name](eagle_net, target, proposal=proposal,
                         keep_ids=keep_ids)
  raise DrafterError(f"unknown drafter {name!r}; known: {list(DRAFTERS)}")


__all__ = ["Drafter", "DrafterError", "EagleDrafter", "HydraDrafter",
           "MedusaDrafter",
           "ModelDrafter",
           "NgramDrafter", "ReDrafterDrafter", "WithLookupChain",
           "merge_chain",
           "Outcome", "Round", "DRAFTERS", "PROPOSALS", "make_drafter", "draft_lm",
           "layer_skip", "parse_layers", "truncated"]
