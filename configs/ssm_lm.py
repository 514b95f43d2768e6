"""A Mamba-2 or hybrid (Mamba-2 + attention) LM on the Python standard
library's source (bytes), issue 17's small trained targets.

Launch:
  python launch/train.py --config=configs/ssm_lm.py --workdir=/tmp/mamba2
  python launch/train.py --config=configs/ssm_lm.py:arch=hybrid --workdir=/tmp/hyb
  python launch/train.py --config=configs/ssm_lm.py:runlocal --workdir=/tmp/x

Arguments after the colon: `arch` (mamba2: every layer Mamba-2, no MLP, as
Mamba2ForCausalLM; hybrid: attention at layers 2 and 5 of 8 and a SwiGLU
MLP after every mixer, as BambaForCausalLM), `runlocal` (a tiny model, a
few files and steps, for a CPU smoke run). Rerunning with the same
`--workdir` resumes from its latest checkpoint.

Sizes: mamba2 8 layers of width 320 (5.3M parameters), hybrid 8 layers of
width 256 (6.2M); vocabulary 260, the byte-level tokenizer's
(`Tokenizer.byte_level`: bytes 0..255 + 4 specials), so the trained model
decodes with it.
"""

import ml_collections

from seqdec import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, arch="mamba2", runlocal=False)
  if arg.arch not in ("mamba2", "hybrid"):
    raise ValueError(f"arch must be mamba2 or hybrid, got {arg.arch!r}")
  hybrid = arg.arch == "hybrid"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ""

  m = c.model = ml_collections.ConfigDict()
  m.family = "hybrid"
  m.vocab_size = 260
  layers = 2 if arg.runlocal else 8
  m.hidden_size = 32 if arg.runlocal else (256 if hybrid else 320)
  if hybrid:
    kinds = ["mamba2"] * layers
    for i in ((1,) if arg.runlocal else (2, 5)):
      kinds[i] = "attention"
    m.layer_types = ",".join(kinds)
  else:
    m.layer_types = ",".join(["mamba2"] * layers)
  m.expand = 2
  m.ssm_head_dim = 16 if arg.runlocal else 64
  m.num_ssm_heads = m.expand * m.hidden_size // m.ssm_head_dim
  m.state_size = 16 if arg.runlocal else 64
  m.n_groups = 1
  m.conv_kernel = 4
  m.chunk_size = 16 if arg.runlocal else 64
  m.intermediate_size = (2 * m.hidden_size) if hybrid else 0
  m.num_heads = 2 if arg.runlocal else 4
  m.num_kv_heads = m.num_heads
  m.head_dim = m.hidden_size // m.num_heads
  m.partial_rotary_factor = 0.5 if hybrid else 1.0
  m.tie_embeddings = True
  m.max_position_embeddings = 4096
  m.scratch_slots = 64
  m.architecture = "BambaForCausalLM" if hybrid else "Mamba2ForCausalLM"
  m.dtype = "float32"
  m.param_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 64 if arg.runlocal else 512
  c.data.batch_size = 4 if arg.runlocal else 8
  c.data.max_files = 20 if arg.runlocal else 0    # 0: every stdlib file
  c.data.valid_fraction = 0.01

  c.train = ml_collections.ConfigDict()
  c.train.steps = 6 if arg.runlocal else 4000
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 2 if arg.runlocal else 200
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.log_every = 2 if arg.runlocal else 50
  c.train.checkpoint_every = 3 if arg.runlocal else 200   # 0: never
  c.train.eval_batches = 2 if arg.runlocal else 16
  return c
