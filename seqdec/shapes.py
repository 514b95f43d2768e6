"""The shape legend: one meaning per letter, in every docstring of seqdec.

Shapes are written `[B, T, V]` in docstrings and signatures (jaxtyping-style
names where a runtime check is wanted in tests). A letter means the same
thing in every module; a module that needs a size not listed here spells it
out (`num_words`, `max_rank`) instead of reusing a letter.

Batches and sequences
  B     batch rows (padded to a bucket)
  T     new tokens of one forward call (prefill: the padded prompt length)
  P     padded prompt length
  S     cache slots per row (committed + scratch)
  W     scratch-window width of a tree-drafting call (W >= T)
  E     stop ids (padded)
  NB    output-buffer length of a decode loop (new tokens per row)

Models
  D     model width (hidden size)
  F     MLP width
  V     vocabulary
  L     layers
  H     query heads
  K     key/value heads (K divides H)
  G     query heads per kv head, H / K
  Dh    head size
  C     channels of a recurrent state (RNN cell width, SSM state width)

Token trees and speculation
  N     tree nodes, root included (node 0 is the root)
  M     max tree depth + 1 (the longest path, so tokens a round can emit)
  R     proposal ranks (Sequoia's per-rank acceptance rates `[R]`)

Parallel scans
  *B    any batch dims (time-major scans take `[T, *B, ...]`)
  Q     chunks of a chunked scan (Q chunks of `chunk` steps)

Kernels
  Bk    keys per block of the tree-attention kernel, Bn nodes per block
  Nr    roots (positions) scored at once by the rank statistics
  Nw    uint32 words per node of a bit-packed mask, ceil(N / 32)
"""

LEGEND = {
    "B": "batch rows", "T": "new tokens of one call",
    "P": "padded prompt length", "S": "cache slots per row",
    "W": "scratch-window width", "E": "stop ids", "NB": "output buffer",
    "D": "model width", "F": "MLP width", "V": "vocabulary", "L": "layers",
    "H": "query heads", "K": "key/value heads", "G": "query heads per kv head",
    "Dh": "head size", "C": "recurrent-state channels", "N": "tree nodes",
    "M": "max tree depth + 1", "R": "proposal ranks", "Q": "scan chunks",
    "Bk": "keys per kernel block", "Bn": "nodes per kernel block",
    "Nw": "uint32 words per node of a packed mask",
    "Nr": "roots scored at once by the rank statistics",
}
