"""Offline training prompts for drafters: six task types from text every
Python install ships (the standard library's source and docstrings).

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

Everything is a pure function of (seed, index): `build_prompts(n, seed)`
always returns the same list, round-robin over the task types. The source is
the `*.py` files of `seqdec.data.stdlib_corpus.stdlib_files`; the repo's
frozen benchmark prompts are never read.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import textwrap

import numpy as np

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


def _math_prompt(rng: np.random.Generator) -> str:
  template = _MATH[rng.integers(len(_MATH))]
  a, b = rng.choice(len(_NAMES), 2, replace=False)
  x, y = int(rng.integers(3, 60)), int(rng.integers(2, 40))
  return template.format(
      a=_NAMES[a], b=_NAMES[b], item=_ITEMS[rng.integers(len(_ITEMS))],
      x=x, y=y, z=int(rng.integers(1, x + 1)), p=int(rng.integers(1, 20)),
      bill=100, h=int(rng.integers(2, 9)), k=int(rng.integers(2, 12)),
      big=int(rng.integers(100, 1000)))


def build_prompt(index: int, seed: int = 0, max_files: int = 0
                 ) -> tuple[str, str]:
  """`(task, user message)` of prompt `index` (task = TASKS[index % 6])."""
  rng = np.random.default_rng([seed, index])
  task = TASKS[index % len(TASKS)]
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
                  max_files: int = 0) -> list[tuple[str, str]]:
  """Prompts `start .. start + n - 1` (`build_prompt`)."""
  return [build_prompt(i, seed, max_files) for i in range(start, start + n)]
