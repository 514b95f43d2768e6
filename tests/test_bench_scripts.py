"""The benchmark scripts run end to end (slow tier: they load real models).

One prompt, a few tokens: the point is that `launch/bench_ar.py` and
`launch/bench_spec.py` still run against the current API and write their
records (a refactor broke `bench_ar.py` once without any test noticing).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def run_script(name, *args):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", name), *args], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.oracle
def test_bench_ar_runs(tmp_path):
  out = tmp_path / "ar.json"
  run_script("bench_ar.py", "--categories=rewrite", "--per_category=1",
             "--max_new_tokens=4", f"--output={out}")
  record = json.loads(out.read_text())
  [row] = record["per_prompt"]
  # (HF's decode rate is T(generate 4) - T(generate 1), which timing noise
  # can make non-positive at 4 tokens: the script then records None.)
  assert row["seqdec"]["decode_tps"] > 0
  assert len(row["seqdec"]["tokens"]) == len(row["hf"]["tokens"]) == 4


def test_bench_spec_runs_on_gemma(tmp_path):
  out = tmp_path / "spec.json"
  run_script("bench_spec.py", "--model=gemma3-270m", "--categories=rewrite",
             "--per_category=1", "--max_new_tokens=8", "--nophases",
             "--methods=ar,ngram/chain4", f"--output={out}")
  record = json.loads(out.read_text())
  [row] = record["per_prompt"]
  assert row["ngram/chain4"]["tokens"] == row["ar"]["tokens"]
  assert record["config"]["model"] == "gemma3-270m"


def test_bench_spec_divides_by_the_fastest_autoregressive_policy(tmp_path):
  """--ar_policies: an autoregressive baseline per extra policy, measured in
  the same run, and the report's denominator is the fastest of them."""
  out = tmp_path / "spec.json"
  run_script("bench_spec.py", "--categories=rewrite", "--per_category=1",
             "--max_new_tokens=8", "--nophases", "--precision=f32_packed",
             "--ar_policies=f32", "--methods=ar,ngram/chain4",
             f"--output={out}")
  record = json.loads(out.read_text())
  [row] = record["per_prompt"]
  assert row["ngram/chain4"]["tokens"] == row["ar"]["tokens"]
  assert "ar[f32]" in row and record["config"]["precision"] == "f32_packed"
  best = record["fastest_ar"]
  tps = {m: record["summary"]["overall"][m]["decode_tps"]["median"]
         for m in ("ar", "ar[f32]")}
  assert best["method"] == max(tps, key=tps.get)
  ngram = record["summary"]["overall"]["ngram/chain4"]["decode_tps"]["median"]
  assert best["speedups"]["overall"]["ngram/chain4"] == pytest.approx(
      ngram / tps[best["method"]])
  assert "fastest autoregressive" in (tmp_path / "spec.md").read_text()
