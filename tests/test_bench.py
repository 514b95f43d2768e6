"""Unit tests of `seqdec.bench`: statistics, prompt-set loading, output.

No model runs: these are fast and need neither weights nor torch.
"""

import json
import os

import numpy as np
import pytest

from seqdec import bench


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("values", [
    [3.0], [1.0, 2.0], [5.0, 1.0, 4.0], [2.5, 2.5, 2.5, 2.5],
    [10.0, -1.0, 7.5, 3.0, 3.0, 100.0, 0.25],
    list(np.random.default_rng(0).normal(size=48)),
])
@pytest.mark.parametrize("q", [0.0, 10.0, 25.0, 50.0, 90.0, 100.0, 33.3])
def test_percentile_matches_numpy_linear(values, q):
  # Pure-Python order statistics vs numpy's default method: equal up to
  # float64 round-off (absolute 1e-12).
  assert abs(bench.percentile(values, q) - np.percentile(values, q)) < 1e-12


def test_median_odd_and_even():
  assert bench.median([3, 1, 2]) == 2.0
  assert bench.median([4, 1, 3, 2]) == 2.5
  assert bench.median(iter([7.0])) == 7.0


def test_percentile_rejects_bad_input():
  with pytest.raises(ValueError):
    bench.percentile([], 50)
  with pytest.raises(ValueError):
    bench.percentile([1.0, float("nan")], 50)
  with pytest.raises(ValueError):
    bench.percentile([1.0], 101)


def test_summarize():
  s = bench.summarize(range(1, 12))  # 1..11
  assert s["median"] == 6.0
  assert s["p10"] == pytest.approx(2.0, abs=1e-12)
  assert s["p90"] == pytest.approx(10.0, abs=1e-12)
  assert (s["min"], s["max"], s["mean"], s["n"]) == (1.0, 11.0, 6.0, 11)
  with pytest.raises(ValueError):
    bench.summarize([])


def test_ratio_and_fmt_stats():
  assert bench.ratio(3.0, 2.0) == 1.5
  assert bench.ratio(1.0, 0.0) is None
  s = bench.summarize([10.0, 20.0, 30.0])
  assert bench.fmt_stats(s) == "20.0 [12.0-28.0]"
  assert bench.fmt_stats(s, 0) == "20 [12-28]"
  assert bench.fmt_stats(None) == "-"


def test_first_divergence():
  assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
  assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1
  assert bench.first_divergence([9], [1]) == 0
  assert bench.first_divergence([1, 2], [1, 2, 3]) == 2
  assert bench.first_divergence([], []) is None


def test_alternating_orders():
  assert bench.alternating_orders(4, ("a", "b")) == [
      ("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]
  orders = bench.alternating_orders(3, ("x", "y", "z"))
  assert [o[0] for o in orders] == ["x", "y", "z"]
  assert all(sorted(o) == ["x", "y", "z"] for o in orders)


def test_group_by_keeps_order():
  rows = [dict(c="b", v=1), dict(c="a", v=2), dict(c="b", v=3)]
  g = bench.group_by(rows, "c", order=("a", "b", "unused"))
  assert list(g) == ["a", "b"]
  assert [r["v"] for r in g["b"]] == [1, 3]
  assert list(bench.group_by(rows, "c")) == ["b", "a"]


def test_stopwatch_and_time_call():
  ticks = iter([10.0, 12.5])
  with bench.Stopwatch(clock=lambda: next(ticks)) as sw:
    pass
  assert sw.seconds == 2.5
  out, seconds = bench.time_call(lambda x, y=0: x + y, 2, y=3)
  assert out == 5 and seconds >= 0.0


# ---------------------------------------------------------------- prompt set


def test_prompt_set_shape():
  prompts = bench.load_prompt_set()
  assert len(prompts) == 6 * 8
  assert len({p.id for p in prompts}) == len(prompts)
  for cat in bench.CATEGORIES:
    ps = [p for p in prompts if p.category == cat]
    assert [p.id for p in ps] == [f"{cat}-{n}" for n in range(1, 9)]
  for p in prompts:
    msgs = p.as_messages()
    assert isinstance(msgs, list) and msgs
    assert all(set(m) == {"role", "content"} for m in msgs)
    assert msgs[-1]["role"] == "user" and msgs[-1]["content"].strip()


def test_prompt_files_format():
  # The raw files: exactly the documented keys on each of 8 lines per file.
  d = bench.default_prompts_dir()
  for cat in bench.CATEGORIES:
    with open(os.path.join(d, f"{cat}.jsonl"), encoding="utf-8") as f:
      recs = [json.loads(line) for line in f]
    assert len(recs) == 8
    for r in recs:
      assert set(r) == {"id", "category", "messages"}
      assert r["category"] == cat
      assert [m["role"] for m in r["messages"]] == ["user"]


def test_passage_categories_hold_real_passages():
  # Summarisation and rewrite prompts are an instruction, a blank line and a
  # passage of 100-250 words.
  for p in bench.load_prompt_set(categories=("summarization", "rewrite")):
    _, passage = p.messages[-1]["content"].split("\n\n", 1)
    assert 100 <= len(passage.split()) <= 250, p.id


def test_prompt_set_subsets():
  prompts = bench.load_prompt_set(categories=("code", "qa"), per_category=2)
  assert [p.id for p in prompts] == ["code-1", "code-2", "qa-1", "qa-2"]
  with pytest.raises(bench.PromptSetError):
    bench.load_prompt_set(per_category=0)


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _rec(cat, n, content="hello"):
  return {"id": f"{cat}-{n}", "category": cat,
          "messages": [{"role": "user", "content": content}]}


def test_load_category_ok(tmp_path):
  path = tmp_path / "qa.jsonl"
  _write(path, [_rec("qa", 1), "", _rec("qa", 2)])
  prompts = bench.load_category(str(path), "qa")
  assert [p.id for p in prompts] == ["qa-1", "qa-2"]
  assert prompts[0].as_messages() == [{"role": "user", "content": "hello"}]
  prompts[0].as_messages()[0]["content"] = "changed"  # a copy
  assert prompts[0].messages[0]["content"] == "hello"


@pytest.mark.parametrize("bad", [
    "{not json",
    {"id": "qa-1", "category": "qa"},                          # no messages
    {**_rec("qa", 1), "extra": 1},                             # extra key
    _rec("qa", 2),                                             # wrong number
    _rec("code", 1),                                           # wrong category
    {**_rec("qa", 1), "messages": []},
    {**_rec("qa", 1), "messages": [{"role": "user"}]},
    {**_rec("qa", 1), "messages": [{"role": "robot", "content": "x"}]},
    {**_rec("qa", 1), "messages": [{"role": "user", "content": "  "}]},
    {**_rec("qa", 1), "messages": [{"role": "assistant", "content": "x"}]},
])
def test_load_category_rejects(tmp_path, bad):
  path = tmp_path / "qa.jsonl"
  _write(path, [bad])
  with pytest.raises(bench.PromptSetError):
    bench.load_category(str(path), "qa")


def test_text_prompts_for_base_models(tmp_path):
  path = tmp_path / "qa.jsonl"
  _write(path, [{"id": "qa-1", "category": "qa", "text": "Once upon"}])
  [p] = bench.load_category(str(path), "qa")
  assert p.as_input() == "Once upon" and p.messages == ()
  for bad in ({"id": "qa-1", "category": "qa", "text": "  "},
              {**_rec("qa", 1), "text": "both"}):
    _write(path, [bad])
    with pytest.raises(bench.PromptSetError):
      bench.load_category(str(path), "qa")


def test_base_prompt_set_and_models():
  """Every benchmark model's prompt set loads with its expected size; the
  base set is all text prompts."""
  for name, m in bench.BENCH_MODELS.items():
    directory = os.path.join(os.path.dirname(bench.default_prompts_dir()),
                             m.prompts)
    prompts = bench.load_prompt_set(directory,
                                    expected_per_category=m.per_category)
    assert len(prompts) == 6 * m.per_category, name
  base = os.path.join(os.path.dirname(bench.default_prompts_dir()),
                      bench.BENCH_MODELS["gemma3-270m"].prompts)
  assert all(isinstance(p.as_input(), str)
             for p in bench.load_prompt_set(base, expected_per_category=4))
  with pytest.raises(bench.PromptSetError, match="unknown benchmark model"):
    bench.bench_model("gpt-5")


def test_load_prompt_set_checks_counts(tmp_path):
  _write(tmp_path / "qa.jsonl", [_rec("qa", n) for n in (1, 2, 3)])
  assert len(bench.load_prompt_set(str(tmp_path), categories=("qa",),
                                   expected_per_category=3)) == 3
  with pytest.raises(bench.PromptSetError, match="expected 8"):
    bench.load_prompt_set(str(tmp_path), categories=("qa",))
  with pytest.raises(bench.PromptSetError, match="does not exist"):
    bench.load_prompt_set(str(tmp_path), categories=("math",))


# -------------------------------------------------------------------- output


def test_write_json_atomic(tmp_path):
  path = tmp_path / "sub" / "r.json"
  bench.write_json(str(path), {"a": [1, 2.5], "b": None})
  assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
  assert os.listdir(path.parent) == ["r.json"]  # no temp file left behind
  with pytest.raises(ValueError):  # NaN is not JSON
    bench.write_json(str(path), {"a": float("nan")})
  assert json.loads(path.read_text())["a"] == [1, 2.5]  # earlier result kept
  assert os.listdir(path.parent) == ["r.json"]


def test_markdown_table():
  t = bench.markdown_table(["x", "y"], [[1, None], ["a|b", "2.0"]])
  assert t.splitlines() == ["| x | y |", "|---|---|", "| 1 | - |",
                            "| a\\|b | 2.0 |"]
  with pytest.raises(ValueError):
    bench.markdown_table(["x"], [[1, 2]])


def test_machine_info():
  info = bench.machine_info()
  assert info["cpu_count"] == os.cpu_count()
  assert len(info["date"]) == 10
  assert info["versions"]["jax"]
  assert bench.package_version("no-such-package-seqdec") is None
  json.dumps(info)
