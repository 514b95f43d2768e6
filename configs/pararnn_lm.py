"""A ParaRNN language model on the Python standard library's source (bytes).

Launch:
  python launch/train.py --config=configs/pararnn_lm.py --workdir=/tmp/lm
  python launch/train.py --config=configs/pararnn_lm.py:cell=paralstm \
      --config.train.steps=2000 --workdir=/tmp/lm_lstm
  python launch/train.py --config=configs/pararnn_lm.py:runlocal --workdir=/tmp/x

Arguments after the colon: `cell` (paragru | paralstm | gru), `mode`
(parallel: Newton solver; sequential: lax.scan), `runlocal` (a tiny model,
a few files and steps, for a CPU smoke run). Rerunning with the same
`--workdir` resumes from its latest checkpoint.
"""

import ml_collections

from seqdec import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, cell="paragru", mode="parallel", runlocal=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Device mesh ('' one device; 'data:2,model:4'; 'auto': every device on
  # data): rows split over data, each process loading its own rows.
  c.mesh = ""

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 256          # bytes
  c.model.dim = 32 if arg.runlocal else 256
  c.model.num_layers = 2 if arg.runlocal else 4
  c.model.cell = arg.cell
  c.model.mode = arg.mode
  c.model.mlp_ratio = 2
  c.model.impl = "auto"             # linear_scan back end of each Newton step
  c.model.chunk = 64
  c.model.tol = 1e-6                # relative residual
  c.model.max_iter = 16
  c.model.damping = 0.0
  c.model.param_dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 64 if arg.runlocal else 1024
  c.data.batch_size = 4 if arg.runlocal else 8
  c.data.max_files = 20 if arg.runlocal else 0    # 0: every stdlib file
  c.data.valid_fraction = 0.01

  c.train = ml_collections.ConfigDict()
  c.train.steps = 6 if arg.runlocal else 5000
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 2 if arg.runlocal else 200
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0
  c.train.log_every = 2 if arg.runlocal else 50
  c.train.checkpoint_every = 3 if arg.runlocal else 500   # 0: never
  c.train.eval_batches = 2 if arg.runlocal else 16
  return c
