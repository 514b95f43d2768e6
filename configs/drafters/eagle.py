"""An EAGLE drafter for a target, trained on the target's cached features.

Launch (build the data first with launch/make_drafter_data.py):
  python launch/train_drafter.py --config=configs/drafters/eagle.py \\
      --workdir=$HOME/.cache/seqdec/train/eagle_smollm2
  python launch/train_drafter.py --config=configs/drafters/eagle.py:runlocal \\
      --workdir=/tmp/eagle_smoke          # tiny target, builds its own data

Arguments after the colon: `model` (the target: a registry name, HF dir or
.gguf), `data` (the dataset directory, or several joined by '+'; default
~/.cache/seqdec/drafter_data/<model>), `runlocal` (a tiny random target,
'tiny' or model=tiny-gemma3, a dataset of a few prompts built on the fly, a
few steps). Rerunning with
the same --workdir resumes from its latest checkpoint. The trained network
is exported to <workdir>/drafter (safetensors + drafter.json with the
target's fingerprint), the path `--config.spec.options.checkpoint` of
configs/spec_decode.py takes.
"""

import os

import ml_collections

from seqdec import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, model="smollm2-135m-instruct", data="",
                               runlocal=False)
  # runlocal: a tiny random target ('tiny', or model=tiny-gemma3).
  model = (arg.model if arg.model.startswith("tiny") else "tiny"
           ) if arg.runlocal else arg.model
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Device mesh ('' one device; 'data:2,model:4'; 'auto': every device on
  # data): rows split over data, each process loading its own rows.
  c.mesh = ""
  c.model = model
  c.runlocal = arg.runlocal

  c.drafter = ml_collections.ConfigDict()
  c.drafter.kind = "eagle"
  # EAGLE-3's fused input: '' (the final features only), 'eagle3' (the
  # inputs of blocks 2 and L // 2 too) or block indices '2,15'. The data
  # must be built with the same taps (make_drafter_data.py --taps).
  c.drafter.taps = ""
  c.drafter.num_heads = 0         # medusa only
  c.drafter.own_heads = False     # medusa only

  c.data = ml_collections.ConfigDict()
  c.data.path = arg.data.replace("+", ",") or os.path.join(
      os.path.expanduser("~"), ".cache", "seqdec", "drafter_data",
      model.replace("-135m-instruct", "").replace("-270m", "")
      + ("_runlocal" if arg.runlocal else ""))
  c.data.batch_size = 4 if arg.runlocal else 8
  c.data.positions = 16 if arg.runlocal else 128   # trained positions per row
  c.data.positions_from = "response"               # or 'all'
  c.data.valid_rows = 4 if arg.runlocal else 64
  # Batches of like-length rows: windows of this many batches sorted by
  # length (0 or 1: random batches); cuts the padding a batch computes.
  c.data.length_groups = 0 if arg.runlocal else 16
  # Trimmed drafter head: the M most frequent response tokens (0: all V).
  c.data.vocab_keep = 128 if arg.runlocal else 8192
  # runlocal builds this many prompts' data (tiny target) when missing.
  c.data.build_prompts = 24 if arg.runlocal else 0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 4 if arg.runlocal else 1500
  c.train.learning_rate = 3e-3 if arg.runlocal else 1e-3
  c.train.warmup_steps = 1 if arg.runlocal else 100
  c.train.weight_decay = 0.0
  c.train.grad_clip = 0.5
  c.train.w_reg = 1.0             # EAGLE: SmoothL1 on features
  c.train.w_ce = 0.1              # EAGLE: CE against the target's head
  c.train.feature_noise = 0.1     # EAGLE: input features + U(-a, a)
  # EAGLE-3's training-time test: passes k = 2.. feed the network its own
  # predicted features, attending as at tree depth k (1: EAGLE-1 only).
  c.train.ttt_steps = 2 if arg.runlocal else 1
  # Validation also reports the greedy chain τ of this depth (0: off).
  c.train.tau_depth = 2 if arg.runlocal else 4
  c.train.log_every = 1 if arg.runlocal else 25
  c.train.eval_every = 2 if arg.runlocal else 250
  c.train.checkpoint_every = 2 if arg.runlocal else 100
  # Warm start: a saved drafter directory (<workdir>/drafter, or a shipped
  # one) whose weights replace the fresh initialisation; the optimizer and
  # schedule start afresh. A resumed run's checkpoint takes precedence.
  c.train.init_from = ""
  return c
