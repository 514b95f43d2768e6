"""launch/decode.py end to end: success paths and bad input.

Bad input must give a one-line `error:` message, a non-zero exit, and no
partial (or clobbered) `--output` file.
"""

import json
import os
import subprocess
import sys

import pytest

from seqdec.models import config as config_lib
import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "decode.py"), *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, fragment):
  assert proc.returncode != 0, proc.stdout
  lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
  assert lines and lines[-1].startswith("error: "), proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = config_lib.PRESETS["tiny"]
  path = str(tmp_path_factory.mktemp("hf"))
  hf_fixtures.write_checkpoint(path, cfg, hf_fixtures.random_hf_tensors(cfg),
                               tokenizer=True)
  return path


def test_prompts_file_to_output(tmp_path, hf_dir):
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("\n".join([
      json.dumps({"id": "a", "prompt": "hello"}),
      json.dumps({"messages": [{"role": "user", "content": "hi there"}]}),
      json.dumps("a bare string"),
  ]) + "\n")
  out = tmp_path / "out.jsonl"
  proc = run_cli(f"--config=configs/decode.py:model={hf_dir}",
                 "--config.max_new_tokens=5", f"--prompts_file={prompts}",
                 f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(ln) for ln in out.read_text().splitlines()]
  assert len(rows) == 3 and rows[0]["id"] == "a"
  assert all(1 <= len(r["tokens"]) <= 5 for r in rows)
  assert all(r["finish_reason"] in ("stop", "length") for r in rows)
  assert "tokens/s" in proc.stderr


def test_single_prompt_streams(tmp_path):
  proc = run_cli("--config=configs/decode.py:runlocal", "--prompt=hello")
  assert proc.returncode == 0, proc.stderr
  assert "[seqdec] model=tiny" in proc.stderr


def run_in_process(config_arg, capsys, prompts=("x",), prompts_file=None,
                   output=None):
  """What `launch/decode.py --config=<config_arg> --prompt=...` runs after
  flag parsing (`cli.run_reporting_user_errors` over `app.run_decode`), in
  this process: (exit status, stderr). The subprocess cases below check
  that the script is this call (one for each error route)."""
  from seqdec import app as seqdec_app  # pylint: disable=g-import-not-at-top
  from seqdec import cli  # pylint: disable=g-import-not-at-top
  from seqdec import config_utils  # pylint: disable=g-import-not-at-top
  capsys.readouterr()
  try:
    cli.run_reporting_user_errors(lambda: seqdec_app.run_decode(
        config_utils.load_config(os.path.join(ROOT, config_arg)),
        prompts=None if prompts_file else list(prompts),
        prompts_file=prompts_file, output=output))
    status = 0
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().err


def assert_one_line_error(status, stderr, fragment):
  assert status == 1, stderr
  lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert fragment in lines[0], lines[0]


def preserved_output(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("previous results\n")  # must survive a failed run
  return out


def assert_output_preserved(out, tmp_path):
  assert out.read_text() == "previous results\n"
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.mark.parametrize("case", ["unknown_key", "oversize"])
def test_bad_input_through_the_script(case, tmp_path):
  """The script's two error routes: absl/config flag parsing (an unknown
  key) and `app.run_decode` (an oversize prompt, after the model loaded)."""
  out = preserved_output(tmp_path)
  args = ["--config=configs/decode.py:runlocal", f"--output={out}"]
  if case == "unknown_key":
    args += ["--config.max_new_tokenz=3", "--prompt=x"]
    fragment = "unknown config key"
  else:
    args += ["--prompt=" + "x" * 1100]
    fragment = "exceeds the model's context"
  assert_user_error(run_cli(*args), fragment)
  assert_output_preserved(out, tmp_path)


@pytest.mark.parametrize("case", ["empty", "unknown_model", "bad_jsonl",
                                  "missing_file"])
def test_bad_input(case, tmp_path, capsys):
  out = preserved_output(tmp_path)
  config, prompts_file = "configs/decode.py:runlocal", None
  path = tmp_path / "in.jsonl"
  if case == "empty":
    path.write_text(json.dumps({"prompt": "ok"}) + "\n"
                    + json.dumps({"prompt": ""}) + "\n")
    prompts_file, fragment = str(path), "prompt 1 is empty"
  elif case == "unknown_model":
    config = "configs/decode.py:model=no-such-model"
    fragment = "unknown model 'no-such-model'"
  elif case == "bad_jsonl":
    path.write_text('{"prompt": "ok"}\n{not json\n')
    prompts_file, fragment = str(path), ":2: not valid JSON"
  else:
    prompts_file, fragment = str(tmp_path / "nope.jsonl"), "does not exist"
  status, stderr = run_in_process(config, capsys, prompts_file=prompts_file,
                                  output=str(out))
  assert_one_line_error(status, stderr, fragment)
  assert_output_preserved(out, tmp_path)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_checkpoint(damage, tmp_path, hf_dir, capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  broken = tmp_path / "ckpt"
  shutil.copytree(hf_dir, broken)
  weights = broken / "model.safetensors"
  if damage == "missing":
    weights.unlink()
  else:
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
  out = tmp_path / "out.jsonl"
  status, stderr = run_in_process(f"configs/decode.py:model={broken}", capsys,
                                  output=str(out))
  assert_one_line_error(status, stderr, "safetensors")
  assert not out.exists()


def test_speculative_decode_reports_tau_speedup_and_agreement(tmp_path):
  out = tmp_path / "out.jsonl"
  proc = run_cli("--config=configs/spec_decode.py:runlocal,spec=ngram/kary2x2",
                 "--prompt=abcabcabcabc", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "tau" in proc.stderr and "speedup" in proc.stderr
  assert "outputs agree: 1/1 rows" in proc.stderr
  [row] = [json.loads(ln) for ln in out.read_text().splitlines()]
  assert row["metrics"]["target_calls"] >= 1 and row["metrics"]["tau"] >= 1


@pytest.mark.parametrize("arg,fragment", [
    ("spec=ngram/bush3", "unknown tree spec 'bush3'"),
    ("spec=lookahead/chain4", "unknown drafter 'lookahead'"),
    ("spec=layerskip@layers=skip:0-99/chain2", "outside 0..1"),
    ("spec=ngram@max_n=3/chain2", "unknown option 'max_n'"),
    ("nosuchkey=1", "unknown config argument"),
])
def test_speculative_bad_config(arg, fragment, capsys):
  status, stderr = run_in_process(f"configs/spec_decode.py:runlocal,{arg}",
                                  capsys)
  assert_one_line_error(status, stderr, fragment)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  """Only `UserError`s (and file-system errors of the user's paths) are
  reported as one line with exit status 1; a bare ValueError from inside
  seqdec is a bug and propagates (issue 13: USER_ERRORS caught ValueError)."""
  from seqdec import app as seqdec_app  # pylint: disable=g-import-not-at-top
  from seqdec import cli  # pylint: disable=g-import-not-at-top
  from seqdec import errors  # pylint: disable=g-import-not-at-top
  assert not isinstance(ValueError("internal"), seqdec_app.USER_ERRORS)
  assert isinstance(errors.ConfigError("bad"), seqdec_app.USER_ERRORS)

  def bug():
    raise ValueError("an internal bug")
  with pytest.raises(ValueError, match="internal bug"):
    cli.run_reporting_user_errors(bug)

  def user():
    raise seqdec_app.PromptError("prompt 0 is empty")
  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_user_errors(user)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "error: prompt 0 is empty\n"
