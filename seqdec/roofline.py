"""What a decoding round costs on an accelerator: bytes, FLOPs, interconnect
traffic and the predicted time, from a model's config (a roofline model).

No accelerator is available to this project, so these are predictions from
published chip figures, not measurements. For one forward of `n` new tokens
per row (n = 1: an autoregressive step; n = tree nodes: a verify), B rows,
S cached tokens per row, weights and cache in bf16 (2 bytes), on `chips`
chips of a tensor-parallel group (weights, heads and MLP split `chips`
ways; `chips` = 1 for one replica):

    weight bytes  W  = 2 * P,   P = V*D (embedding; + D*V untied head)
                       + L * (D*(H+2K)*Dh + H*Dh*D + 3*D*F)
    cache bytes   C  = 2 * B * S * L * 2*K*Dh           (K and V read once;
                       a sliding-window layer reads min(S, window))
    FLOPs         Fl = 2 * B*n * P_matmul + 4 * B*n * S * L * H*Dh
    HBM time         = (W + C) / chips / HBM_bandwidth
    compute time     = Fl / chips / peak_bf16
    ICI bytes        = 2 * L all-reduces of the [B*n, D] bf16 activations
                       (after the attention and after the MLP, Megatron
                       style), ring: 2*(chips-1)/chips * B*n*D*2 each
    ICI time         = ICI bytes / ICI_bandwidth + 2*L * allreduce_latency
    round time     t = max(HBM time, compute time) + ICI time

P_matmul counts the LM head once (the embedding lookup is a gather: its
bytes are counted only when tied, as the head's). A speculative round costs
t_verify(n) + sum over draft levels of the drafter's own forward, and emits
tau tokens on average, so

    tokens/s (AR)   = B / t(1)
    tokens/s (spec) = B * tau / (t_verify(n) + t_draft)

`allreduce_latency` (a fixed cost per collective) is an assumption, stated
in the output. While decoding is memory-bound (FLOPs / bytes below the
chip's ridge point, ~240 FLOP/byte on v5e), t_verify(n) is close to t(1)
for n up to tens of tokens, which is what makes trees pay on accelerators
and not on this project's CPU (`benchmarks/results/spec*.md`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from seqdec.models.config import TransformerConfig

BF16 = 2


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (HBM bandwidth and capacity, dense bf16
  peak, interchip bandwidth per chip, all links)."""
  name: str
  hbm_bytes_per_s: float
  peak_flops: float
  ici_bytes_per_s: float
  hbm_bytes: float
  source: str


# Cloud TPU v5e: 819 GB/s HBM2, 16 GB, 197 TFLOP/s bf16, ICI 1,600 Gbps per
# chip (cloud.google.com/tpu/docs/v5e).
TPU_V5E = Chip("TPU v5e", 819e9, 197e12, 1600e9 / 8, 16e9,
               "cloud.google.com/tpu/docs/v5e")


def parameter_counts(c: TransformerConfig) -> dict[str, int]:
  """Parameters: per decoder layer, all layers, embedding, LM head."""
  d, h, k, dh, f = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                    c.intermediate_size)
  layer = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
  embed = c.vocab_size * d
  return dict(layer=layer, layers=c.num_layers * layer, embed=embed,
              head=embed, total=c.num_layers * layer + embed
              + (0 if c.tie_embeddings else embed))


def forward_cost(c: TransformerConfig, *, batch: int, new_tokens: int,
                 context: int, chips: int = 1, layers: Optional[int] = None,
                 head_rows: Optional[int] = None) -> dict[str, float]:
  """Bytes, FLOPs and ICI bytes per chip of one forward (module docstring).

  layers: decoder layers run (default all; a layer-skip or EAGLE drafter
    runs fewer); head_rows: LM head rows scored (default V; a trimmed
    drafter head scores fewer).
  """
  counts = parameter_counts(c)
  nl = c.num_layers if layers is None else layers
  rows = c.vocab_size if head_rows is None else head_rows
  m = batch * new_tokens
  weights = BF16 * (nl * counts["layer"] + rows * c.hidden_size)
  # Sliding-window layers read at most their window of the cache.
  visible = sum(min(context, c.layer_window(i) or context)
                for i in range(nl))
  cache = BF16 * batch * visible * 2 * c.num_kv_heads * c.head_dim
  flops = (2 * m * (nl * counts["layer"] + rows * c.hidden_size)
           + 4 * m * visible * c.num_heads * c.head_dim)
  ici = 0.0 if chips == 1 else (
      2 * nl * 2 * (chips - 1) / chips * m * c.hidden_size * BF16)
  return dict(bytes=(weights + cache) / chips, flops=flops / chips,
              ici_bytes=ici, collectives=0 if chips == 1 else 2 * nl)


def predicted_seconds(cost: dict[str, float], chip: Chip,
                      allreduce_latency: float) -> float:
  """max(HBM time, compute time) + ICI time of a `forward_cost`."""
  return (max(cost["bytes"] / chip.hbm_bytes_per_s,
              cost["flops"] / chip.peak_flops)
          + cost["ici_bytes"] / chip.ici_bytes_per_s
          + cost["collectives"] * allreduce_latency)
