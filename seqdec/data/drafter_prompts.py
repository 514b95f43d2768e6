"""Offline training prompts for drafters: six task types from text every
Python install ships (the standard library's source and docstrings) and,
given `Texts`, from the Python documentation's prose and WordNet's everyday
words (Debian packages, `seqdec.data.offline_text`).

A drafter is trained on the target's own responses to these prompts
(self-distillation, as DistillSpec and EAGLE's regenerated data do), so
the prompts only need to cover the kinds of requests a chat model serves:

    writing        an explanation / a note / a short story seeded by a topic
                   taken from a docstring's first sentence
    qa             a question about a stdlib function, class or concept
    summarization  "summarise" + a docstring paragraph (or a module docstring)
    rewrite        a docstring paragraph to rewrite (simpler, formal, past
                   tense, bullet points, ...)
    math           arithmetic word problems drawn from templates and numbers
    code           write a function from a docstring's first sentence, or
                   explain / document / test a short stdlib function

With `Texts`, a share of each task's prompts (`_EXTRA_SHARE`) comes instead
from general-domain templates: stories, poems, definitions and comparisons
of WordNet words, summaries and rewrites of documentation paragraphs and of
WordNet's example sentences, generic programming exercises, more arithmetic.

Everything is a pure function of (seed, index, sources): `build_prompts(n,
seed)` always returns the same list, round-robin over the task types. The
sources are the `*.py` files of `seqdec.data.stdlib_corpus.stdlib_files`
(and the unpacked packages); the repo's frozen benchmark prompts are never
read.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import textwrap
from typing import Optional

import numpy as np

from seqdec.data import offline_text
from seqdec.data import stdlib_corpus

TASKS = ("writing", "qa", "summarization", "rewrite", "math", "code")


@dataclasses.dataclass(frozen=True)
class Snippet:
  """A documented stdlib object: where it is, what it says, its source."""
  module: str
  name: str
  kind: str                 # 'function' | 'class' | 'module'
  summary: str              # the docstring's first sentence
  paragraph: str            # the docstring's longest paragraph
  source: str               # the function's source ('' unless short)


def _first_sentence(doc: str) -> str:
  text = " ".join(doc.strip().split("\n\n")[0].split())
  m = re.match(r"(.+?[.!?])(\s|$)", text)
  return (m.group(1) if m else text).strip()


def _longest_paragraph(doc: str) -> str:
  paras = [" ".join(p.split()) for p in doc.strip().split("\n\n")]
  prose = [p for p in paras if p and not p.lstrip().startswith((">>>", "..."))]
  return max(prose, key=len) if prose else ""


def _snippets_of(path) -> list[Snippet]:
  try:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
  except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
    return []
  lines = text.splitlines()
  module = path.stem
  out = []
  doc = ast.get_docstring(tree)
  if doc and len(doc) > 80:
    out.append(Snippet(module, module, "module", _first_sentence(doc),
                       _longest_paragraph(doc), ""))
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      continue
    if node.name.startswith("_"):
      continue
    doc = ast.get_docstring(node)
    if not doc or len(doc) < 40:
      continue
    source = ""
    if isinstance(node, ast.FunctionDef) and node.end_lineno:
      body = lines[node.lineno - 1:node.end_lineno]
      if 4 <= len(body) <= 30:
        source = textwrap.dedent("\n".join(body))
    out.append(Snippet(module, node.name,
                       "class" if isinstance(node, ast.ClassDef)
                       else "function", _first_sentence(doc),
                       _longest_paragraph(doc), source))
  return out


@functools.lru_cache(maxsize=2)
def snippets(max_files: int = 0) -> tuple[Snippet, ...]:
  """Every documented public object of the stdlib, in file order."""
  out = []
  for path in stdlib_corpus.stdlib_files(max_files):
    if "test" in path.parts or path.name.startswith("test_"):
      continue
    out.extend(_snippets_of(path))
  if not out:
    raise FileNotFoundError("no documented objects in the stdlib source")
  return tuple(out)


_WRITING = (
    "Write a short blog post for beginners about this idea from "
    "programming: {summary}",
    "Write a friendly paragraph that explains to a non-programmer why "
    "this is useful: {summary}",
    "Write a short story in which a developer discovers the `{name}` "
    "{kind} of Python's `{module}` module. It is described as: {summary}",
    "Write an email to a colleague recommending the `{module}` module. "
    "Mention that {lsummary}",
)
_QA = (
    "What does `{module}.{name}` do in Python?",
    "In Python's standard library, what is the purpose of the `{name}` "
    "{kind} in `{module}`?",
    "When would I use `{module}.{name}` instead of writing my own code?",
    "Is this statement about Python's `{module}` module correct? "
    "\"{summary}\" Explain briefly.",
)
_SUMMARY = (
    "Summarize the following documentation in one or two sentences:\n\n"
    "{paragraph}",
    "Give a three-bullet summary of this text:\n\n{paragraph}",
    "TL;DR of the following:\n\n{paragraph}",
)
_REWRITE = (
    "Rewrite the following text in simpler words:\n\n{paragraph}",
    "Rewrite this paragraph in a formal tone:\n\n{paragraph}",
    "Rewrite the following as a numbered list of short points:\n\n"
    "{paragraph}",
    "Fix any grammar problems and rewrite this text more concisely:\n\n"
    "{paragraph}",
)
_CODE = (
    "Write a Python function that does the following: {lsummary}",
    "Explain what this Python function does, step by step:\n\n"
    "```python\n{source}\n```",
    "Write unit tests with pytest for this function:\n\n```python\n"
    "{source}\n```",
    "Add type hints and a docstring to this function:\n\n```python\n"
    "{source}\n```",
)
_ITEMS = ("apples", "books", "pencils", "tickets", "boxes", "cookies",
          "stamps", "marbles", "bottles", "chairs")
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana",
          "Ivo", "Jun")
_MATH = (
    "{a} has {x} {item}. {b} gives {a} {y} more, and then {a} gives away "
    "{z}. How many {item} does {a} have now?",
    "A shop sells {item} at ${p} each. {a} buys {x} of them and pays with "
    "a ${bill} note. How much change does {a} get?",
    "A train travels {x} km in {h} hours. At the same speed, how far does "
    "it travel in {k} hours?",
    "What is {x} * {y} - {z}? Show your work.",
    "{a} saves ${y} every week. How many weeks until {a} has at least "
    "${big}?",
    "A rectangle is {x} cm long and {h} cm wide. What are its area and "
    "perimeter?",
    "Solve for n: {h}n + {y} = {big}.",
    "{x} students share {big} {item} equally. How many does each get, and "
    "how many are left over?",
)


def _math_prompt(rng: np.random.Generator, templates=_MATH) -> str:
  template = templates[rng.integers(len(templates))]
  a, b = rng.choice(len(_NAMES), 2, replace=False)
  x, y = int(rng.integers(3, 60)), int(rng.integers(2, 40))
  return template.format(
      a=_NAMES[a], b=_NAMES[b], item=_ITEMS[rng.integers(len(_ITEMS))],
      x=x, y=y, z=int(rng.integers(1, x + 1)), p=int(rng.integers(1, 20)),
      bill=100, h=int(rng.integers(2, 9)), k=int(rng.integers(2, 12)),
      big=int(rng.integers(100, 1000)),
      pct=int(rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))))


# --- Prompts over the Debian text sources (`offline_text`) -------------------
# Used when `build_prompt` gets `texts`: general-domain requests built from
# WordNet's everyday words and the Python documentation's prose, so the
# drafter also sees the target answer outside the standard library's world.

_WORD_WRITING = (
    "Write a short story about {a_noun}.",
    "Write a short poem about {nouns}.",
    "Write a paragraph describing {a_noun} to someone who has never seen "
    "one.",
    "Write a persuasive paragraph about why {nouns} matter in everyday "
    "life.",
    "Write a short dialogue between two friends who disagree about {nouns}.",
    "Write a haiku about {a_noun}.",
    "Write a product description for {a_noun}.",
    "Write a short motivational note encouraging a friend to {verb}.",
    "Write a short description of a place that feels {adj}.",
    "Write a letter to a newspaper about {nouns} in your town.",
)
_WORD_QA = (
    "What is {a_noun}?",
    "What is the difference between {a_noun} and {a_noun2}?",
    "What does the word \"{word}\" mean? Give an example sentence.",
    "Give three interesting facts about {nouns}.",
    "How would you explain to a child what it means to {verb}?",
    "Why do people {verb}?",
    "What are some synonyms of \"{word}\"?",
    "Is this a good definition of \"{word}\": {gloss}? Explain briefly.",
    "Where would you usually find {a_noun}, and what is it used for?",
)
_DOC_SUMMARY = _SUMMARY + (
    "Explain the main idea of this passage in plain language:\n\n"
    "{paragraph}",
    "What is the key point of the following text? Answer in one "
    "sentence.\n\n{paragraph}",
)
_SENTENCE_REWRITE = (
    "Rewrite this sentence in the passive voice: \"{sentence}\"",
    "Paraphrase this sentence: \"{sentence}\"",
    "Make this sentence more formal: \"{sentence}\"",
    "Rewrite this sentence so that a child could understand it: "
    "\"{sentence}\"",
    "Expand this sentence into a short paragraph: \"{sentence}\"",
)
_CODE_TASKS = (
    "reverses a string", "checks whether a number is prime",
    "merges two sorted lists into one sorted list",
    "removes duplicates from a list while keeping the order",
    "computes the factorial of n recursively", "counts the vowels in a string",
    "converts a temperature from Celsius to Fahrenheit",
    "flattens a nested list", "finds the most common word in a text",
    "computes the greatest common divisor of two numbers",
    "sorts a list of tuples by their second element",
    "implements binary search on a sorted list",
    "returns the n-th Fibonacci number",
    "checks whether two strings are anagrams",
    "finds the second largest number in a list",
    "groups a list of words by their first letter",
)
_CODE_GENERIC = (
    "Write a Python function that {task}.",
    "Write a Python function that {task}. Include a docstring and an "
    "example call.",
    "Explain how a program that {task} works, then give the Python code.",
    "Write a JavaScript function that {task}.",
    "Write a Python function that counts how often the word \"{word}\" "
    "appears in a text, ignoring case.",
    "Write a Python class `{camel}` that represents {a_noun}, with an "
    "__init__ method and a __str__ method.",
    "Write a Python function that takes a list of {nouns} as dictionaries "
    "with a 'name' and a 'price' and returns the cheapest one.",
    "Write a Python script that reads a CSV file of {nouns} and prints how "
    "many rows it has.",
)
_MATH_MORE = (
    "What is {pct}% of {big}?",
    "What is the average of {x}, {y} and {z}?",
    "{a} reads {y} pages a day. How many pages does {a} read in {k} weeks?",
    "A recipe needs {h} cups of flour for {x} cookies. How much flour is "
    "needed for {big} cookies?",
    "Convert {big} minutes into hours and minutes.",
    "A jacket costs ${big} and is on sale for {pct}% off. What is the sale "
    "price?",
    "If {x} workers build a wall in {h} days, how long would {k} workers "
    "take at the same rate?",
    "What is the sum of the whole numbers from 1 to {x}?",
)
# Probability that a task's prompt comes from the Debian sources (the rest
# from the stdlib templates above) when `texts` is given.
_EXTRA_SHARE = dict(writing=0.75, qa=0.75, summarization=0.67, rewrite=0.67,
                    math=0.5, code=0.5)


@dataclasses.dataclass(frozen=True)
class Texts:
  """Unpacked Debian text sources (`offline_text.fetch`): package roots."""
  pydocs: str
  wordnet: str

  @classmethod
  def fetch(cls, cache_dir: str) -> "Texts":
    roots = offline_text.fetch(cache_dir)
    return cls(str(roots["pydocs"]), str(roots["wordnet"]))


def _plural(noun: str) -> str:
  if re.search(r"(s|x|z|ch|sh)$", noun):
    return noun + "es"
  if re.search(r"[^aeiou]y$", noun):
    return noun[:-1] + "ies"
  return noun + "s"


def _article(noun: str) -> str:
  return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _pick(rng: np.random.Generator, pool, ok=lambda _: True):
  for _ in range(100):
    item = pool[rng.integers(len(pool))]
    if ok(item):
      return item
  return item


def _word_fields(rng: np.random.Generator, texts: Texts) -> dict:
  words = offline_text.common_words(texts.wordnet)
  noun, noun2 = (_pick(rng, words, lambda w: w.pos == "noun")
                 for _ in range(2))
  verb = _pick(rng, words, lambda w: w.pos == "verb")
  adj = _pick(rng, words, lambda w: w.pos == "adj")
  word = words[rng.integers(len(words))]
  return dict(a_noun=_article(noun.lemma), a_noun2=_article(noun2.lemma),
              nouns=_plural(noun.lemma), verb=verb.lemma, adj=adj.lemma,
              word=word.lemma, gloss=word.gloss,
              camel="".join(p.capitalize() for p in re.split(
                  r"[\s-]+", noun.lemma)))


def _extra_prompt(task: str, rng: np.random.Generator, texts: Texts) -> str:
  """A prompt of `task` from the Debian sources (`Texts`)."""
  if task == "math":
    return _math_prompt(rng, _MATH_MORE)
  if task in ("summarization", "rewrite") and (
      task == "summarization" or rng.random() < 0.5):
    paragraphs = offline_text.doc_paragraphs(texts.pydocs)
    templates = _DOC_SUMMARY if task == "summarization" else _REWRITE
    return templates[rng.integers(len(templates))].format(
        paragraph=paragraphs[rng.integers(len(paragraphs))])
  if task == "rewrite":
    words = offline_text.common_words(texts.wordnet)
    sentence = _pick(rng, words, lambda w: bool(w.examples)).examples
    sentence = sentence[rng.integers(len(sentence))]
    sentence = sentence[:1].upper() + sentence[1:]
    if not sentence.endswith((".", "!", "?")):
      sentence += "."
    return _SENTENCE_REWRITE[rng.integers(len(_SENTENCE_REWRITE))].format(
        sentence=sentence)
  templates = dict(writing=_WORD_WRITING, qa=_WORD_QA,
                   code=_CODE_GENERIC)[task]
  template = templates[rng.integers(len(templates))]
  return template.format(task=_CODE_TASKS[rng.integers(len(_CODE_TASKS))],
                         **_word_fields(rng, texts))


def build_prompt(index: int, seed: int = 0, max_files: int = 0,
                 texts: Optional[Texts] = None) -> tuple[str, str]:
  """`(task, user message)` of prompt `index` (task = TASKS[index % 6]).

  Without `texts`, every prompt comes from the standard library (the first
  shipped drafter's recipe, unchanged); with them, a task-dependent share
  (`_EXTRA_SHARE`) comes from the Python docs and WordNet instead.
  """
  rng = np.random.default_rng([seed, index])
  task = TASKS[index % len(TASKS)]
  if texts is not None and rng.random() < _EXTRA_SHARE[task]:
    return task, _extra_prompt(task, rng, texts)
  if task == "math":
    return task, _math_prompt(rng)
  pool = snippets(max_files)
  templates = dict(writing=_WRITING, qa=_QA, summarization=_SUMMARY,
                   rewrite=_REWRITE, code=_CODE)[task]
  template = templates[rng.integers(len(templates))]
  for _ in range(100):   # a snippet that has what the template asks for
    s = pool[rng.integers(len(pool))]
    if "{source}" in template and not s.source:
      continue
    if "{paragraph}" in template and not 150 <= len(s.paragraph) <= 1200:
      continue
    break
  lsummary = s.summary[:1].lower() + s.summary[1:]
  return task, template.format(
      module=s.module, name=s.name, kind=s.kind, summary=s.summary,
      lsummary=lsummary, paragraph=s.paragraph, source=s.source)


def build_prompts(n: int, seed: int = 0, start: int = 0,
                  max_files: int = 0, texts: Optional[Texts] = None
                  ) -> list[tuple[str, str]]:
  """Prompts `start .. start + n - 1` (`build_prompt`)."""
  return [build_prompt(i, seed, max_files, texts)
          for i in range(start, start + n)]
