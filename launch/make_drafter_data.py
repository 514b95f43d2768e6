"""Builds a drafter training set: the target's responses and features.

  python launch/make_drafter_data.py --model=smollm2-135m-instruct \\
      --num_prompts=2400 --out=$HOME/.cache/seqdec/drafter_data/smollm2
  python launch/make_drafter_data.py --model=tiny --num_prompts=32 \\
      --max_new_tokens=16 --out=/tmp/tiny_data             # smoke run

Prompts come from `seqdec.data.drafter_prompts` (six task types built from
the Python standard library's source and, with --debian_text (default), the
Python documentation's prose and WordNet's everyday words, fetched once with
`apt-get download` into --text_cache; never the benchmark prompts), indices
--first_prompt .. --first_prompt + --num_prompts - 1 of --prompt_seed. The
target answers each (greedy at --temperature=0), and one teacher-forced
forward gives its features; both go to tensorstore arrays under --out
(`seqdec.data.features`), chunk by chunk, so rerunning the same command
resumes an interrupted build. Prints a JSON summary.

Responses are most of the cost. --save_responses keeps them in a small
response store (`seqdec.data.responses`, two bytes a token), and a later
build with --responses=<store> (same recipe and target) computes only the
features of the rows it holds and generates the rest:

  python launch/make_drafter_data.py --num_prompts=6144 --chunk=64 \
      --group=4 --gen_precision=bf16_weights --out=$D \
      --responses=seqdec/checkpoints/shipped/smollm2-135m-instruct-eagle/responses.npz
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

from seqdec import cli
from seqdec.errors import UserError

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "Target: a registry name, HF dir or .gguf.")
_OUT = flags.DEFINE_string("out", None, "Dataset directory.")
_NUM = flags.DEFINE_integer("num_prompts", 2400, "Prompts to answer.")
_FIRST = flags.DEFINE_integer("first_prompt", 0, "Index of the first prompt.")
_PROMPT_SEED = flags.DEFINE_integer("prompt_seed", 0, "Prompt builder seed.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 256,
                                   "Prompts are cut to this many tokens.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 192, "Response budget.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy responses.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (temperature > 0).")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Rows generated per batch.")
_GROUP = flags.DEFINE_integer(
    "group", 4, "Chunks per block: a block's prompts are generated in order "
    "of length (less padding), and written (and resumed) together.")
_GEN_PRECISION = flags.DEFINE_string(
    "gen_precision", "f32", "Precision policy of the model that writes the "
    "responses (f32, bf16_weights); features always come from the f32 "
    "target.")
_DEBIAN_TEXT = flags.DEFINE_bool(
    "debian_text", True, "Also build prompts from the Python docs and WordNet "
    "(Debian packages python3.11-doc, wordnet-base); --nodebian_text: the "
    "standard library only (the first shipped drafter's recipe).")
_RESPONSES = flags.DEFINE_string(
    "responses", None, "A response store (seqdec.data.responses) of this "
    "recipe: its rows are not generated again, only their features computed.")
_SAVE_RESPONSES = flags.DEFINE_string(
    "save_responses", None, "After the build, save its finished rows' "
    "responses as a response store here.")
_EXPORT_ONLY = flags.DEFINE_bool(
    "export_only", False, "With --save_responses: save the finished rows of "
    "the dataset at --out as it is (e.g. a build stopped part-way), without "
    "building.")
_TAPS = flags.DEFINE_string(
    "taps", "", "EAGLE-3's fused features: 'eagle3' (the inputs of blocks 2 "
    "and L // 2 besides the final features) or block indices '2,15'; the "
    "drafter's drafter.taps must match. Default: the final features only.")
_TEXT_CACHE = flags.DEFINE_string(
    "text_cache", None, "Where the Debian packages are unpacked (default "
    "~/.cache/seqdec/offline_text).")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def check_flags() -> None:
  if not _OUT.value:
    raise UserError("--out is required")
  for name, flag in (("num_prompts", _NUM), ("max_prompt_tokens", _MAX_PROMPT),
                     ("max_new_tokens", _MAX_NEW), ("chunk", _CHUNK),
                     ("group", _GROUP)):
    if flag.value < 1:
      raise UserError(f"--{name} must be >= 1, got {flag.value}")
  if _FIRST.value < 0 or _TEMPERATURE.value < 0:
    raise UserError("--first_prompt and --temperature must be >= 0")
  if _EXPORT_ONLY.value and not _SAVE_RESPONSES.value:
    raise UserError("--export_only needs --save_responses")


def parse_taps(model) -> tuple[int, ...]:
  """--taps as block indices of `model` (UserError if invalid)."""
  from seqdec.models import eagle  # pylint: disable=g-import-not-at-top
  try:
    return eagle.parse_taps(_TAPS.value, model.config.num_layers)
  except ValueError as e:
    raise UserError(f"--taps: {e}") from None


def run() -> dict:
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.data import drafter_prompts, features, offline_text, responses
  # pylint: enable=g-import-not-at-top
  t0 = time.perf_counter()
  if _EXPORT_ONLY.value:
    ds = features.FeatureDataset.open(_OUT.value)
    rows = features.export_responses(ds, _SAVE_RESPONSES.value)
    return dict(out=_SAVE_RESPONSES.value, rows=rows,
                bytes=os.path.getsize(_SAVE_RESPONSES.value))
  texts = None
  if _DEBIAN_TEXT.value:
    texts = drafter_prompts.Texts.fetch(
        _TEXT_CACHE.value or offline_text.default_cache_dir())
  model, tokenizer = seqdec.load_pretrained(_MODEL.value)
  writer = None
  if _GEN_PRECISION.value != "f32":
    writer, _ = seqdec.load_pretrained(_MODEL.value,
                                       precision=_GEN_PRECISION.value)
  prompts = drafter_prompts.build_prompts(_NUM.value, _PROMPT_SEED.value,
                                          _FIRST.value, texts=texts)
  ds = features.build(
      _OUT.value, model, tokenizer, prompts,
      meta=dict(model=_MODEL.value, prompt_seed=_PROMPT_SEED.value,
                first_prompt=_FIRST.value,
                text_sources=(sorted(offline_text.PACKAGES.values())
                              if texts else []),
                gen_precision=_GEN_PRECISION.value,
                tasks=[t for t, _ in prompts],
                command="python launch/make_drafter_data.py "
                + " ".join(sys.argv[1:])),
      max_prompt=_MAX_PROMPT.value, max_new=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, seed=_SEED.value, chunk=_CHUNK.value,
      group=_GROUP.value, generator_model=writer, taps=parse_taps(model),
      responses=(responses.ResponseStore.open(_RESPONSES.value)
                 if _RESPONSES.value else None), log=log)
  if _SAVE_RESPONSES.value:
    features.export_responses(ds, _SAVE_RESPONSES.value)
  data = ds.read(list(range(ds.rows)))
  response = int((data["lengths"] - data["prompt_lens"]).sum())
  seconds = time.perf_counter() - t0
  return dict(out=ds.path, rows=ds.rows, tokens=int(data["lengths"].sum()),
              response_tokens=response, seconds=round(seconds, 1),
              response_tokens_per_s=round(response / seconds, 1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_reporting_user_errors(check_flags)
  print(json.dumps(cli.run_reporting_user_errors(run), indent=2))


if __name__ == "__main__":
  app.run(main)
