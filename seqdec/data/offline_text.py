"""Offline text beyond the standard library, for drafter prompts: the Python
documentation's reST sources and WordNet's word senses, from Debian packages.

`fetch(cache_dir)` runs `apt-get download` once per package and unpacks it
with `dpkg-deb -x` under `cache_dir` (a build step of
`launch/make_drafter_data.py`; decoding never fetches anything). The readers
take the unpacked tree:

    doc_paragraphs(root)   prose paragraphs of the Python docs (tutorial,
                           how-tos, library reference, FAQ ...): reST markup
                           reduced to its text, code blocks, directives,
                           headings and tables dropped
    common_words(root)     WordNet lemmas with at least one sense seen in the
                           SemCor sample (`tagsense_cnt` > 0 in index.<pos>):
                           everyday words, each with its most frequent sense's
                           gloss and example sentences

Both are pure functions of the files, in sorted order, so prompts built from
them are a pure function of (seed, index) too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import shutil
import subprocess

from seqdec.errors import UserError

PACKAGES = {"pydocs": "python3.11-doc", "wordnet": "wordnet-base"}
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
WORDNET = "usr/share/wordnet"
_DONE = ".unpacked"


class TextSourceError(UserError):
  """A text source that is missing, unreadable or could not be fetched."""


def fetch(cache_dir: str, sources=tuple(PACKAGES)) -> dict[str, pathlib.Path]:
  """Unpacked package root of each source under `cache_dir` (fetched with
  `apt-get download` and `dpkg-deb -x` when not already there).

  Raises:
    TextSourceError: an unknown source, or apt-get / dpkg-deb missing or
      failing (the message names the package and the command).
  """
  out = {}
  for source in sources:
    if source not in PACKAGES:
      raise TextSourceError(f"unknown text source {source!r}; known: "
                            f"{sorted(PACKAGES)}")
    package = PACKAGES[source]
    root = pathlib.Path(cache_dir, package)
    if not (root / _DONE).exists():
      _download_and_unpack(package, root)
    out[source] = root
  return out


def _download_and_unpack(package: str, root: pathlib.Path) -> None:
  for tool in ("apt-get", "dpkg-deb"):
    if shutil.which(tool) is None:
      raise TextSourceError(f"{tool} not found: the {package!r} text source "
                            f"is a Debian package (or unpack it yourself "
                            f"under {str(root)!r})")
  debs = root.parent / "debs"
  debs.mkdir(parents=True, exist_ok=True)
  _run(["apt-get", "download", package], debs, package)
  found = sorted(debs.glob(f"{package}_*.deb"))
  if not found:
    raise TextSourceError(f"apt-get download {package} left no .deb in "
                          f"{str(debs)!r}")
  if root.exists():
    shutil.rmtree(root)
  _run(["dpkg-deb", "-x", str(found[-1]), str(root)], debs, package)
  (root / _DONE).write_text(found[-1].name + "\n", encoding="utf-8")


def _run(cmd: list[str], cwd: pathlib.Path, package: str) -> None:
  try:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True,
                   timeout=600)
  except subprocess.CalledProcessError as e:
    tail = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or [""]
    raise TextSourceError(f"{' '.join(cmd)} failed for {package!r}: "
                          f"{tail[0][:200]}") from None
  except subprocess.TimeoutExpired:
    raise TextSourceError(f"{' '.join(cmd)} timed out for {package!r}"
                          ) from None


# --- Python documentation (reST sources) ------------------------------------

_ROLE = re.compile(r":[\w:.-]+:`(?:[^`<]*<([^`>]+)>|([^`]+))`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}([^*\n]+?)\*{1,2}(?![\w*])")
_HEADING = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")


def _role_text(m: re.Match) -> str:
  text = m.group(2) if m.group(2) is not None else m.group(1)
  return text.lstrip("~!.")


def clean_rest(text: str) -> str:
  """One paragraph of reST as plain text (roles, links, literals and
  emphasis reduced to their words, whitespace folded)."""
  text = _ROLE.sub(_role_text, text)
  text = _LINK.sub(r"\1", text)
  text = _LITERAL.sub(r"\1", text)
  text = _EMPH.sub(r"\1", text)
  text = text.replace("\\", "")
  return " ".join(text.split())


def _is_prose(block: list[str]) -> bool:
  first = block[0]
  if first.startswith((" ", "\t", "..", ">>>", "|", "+-", "=", "* ", "- ",
                       "#. ")) or re.match(r"\d+\. ", first):
    return False
  if any(_HEADING.match(line) for line in block):
    return False
  return not any(line.strip() == "::" for line in block)  # a lone "::"


def paragraphs_of(text: str) -> list[str]:
  """The prose paragraphs of one reST document: top-level blocks that are
  not indented (code, directive bodies), headings, lists or tables."""
  out, block = [], []
  for line in text.splitlines() + [""]:
    if line.strip():
      block.append(line)
      continue
    if block and _is_prose(block):
      para = clean_rest(" ".join(block))
      if para.endswith("::"):       # "... as follows::" introduces code
        para = para[:-1]
      out.append(para)
    block = []
  return out


@functools.lru_cache(maxsize=4)
def doc_paragraphs(root: str, min_len: int = 150, max_len: int = 1200
                   ) -> tuple[str, ...]:
  """Prose paragraphs of every `*.rst.txt` under `root`'s doc sources with
  `min_len` <= length <= `max_len`, mostly letters, in sorted file order.

  Raises:
    TextSourceError: no reST sources under `root`.
  """
  base = pathlib.Path(root, DOC_SOURCES)
  files = sorted(base.rglob("*.rst.txt")) if base.is_dir() else []
  if not files:
    raise TextSourceError(f"no Python documentation sources under "
                          f"{str(base)!r} (fetch the 'pydocs' source)")
  out = []
  for path in files:
    if path.parts[-2] in ("whatsnew", "c-api") or path.name.startswith(
        ("changelog", "license")):
      continue        # release notes and C API: lists of names, not prose
    for para in paragraphs_of(path.read_text(encoding="utf-8",
                                             errors="replace")):
      letters = sum(c.isalpha() or c == " " for c in para)
      if min_len <= len(para) <= max_len and letters >= 0.85 * len(para):
        out.append(para)
  if not out:
    raise TextSourceError(f"no prose paragraphs in {str(base)!r}")
  return tuple(out)


# --- WordNet ----------------------------------------------------------------

POS = ("noun", "verb", "adj")


@dataclasses.dataclass(frozen=True)
class Word:
  """An everyday word: its lemma, part of speech and most frequent sense."""
  lemma: str            # spaces, not underscores
  pos: str              # 'noun' | 'verb' | 'adj'
  gloss: str            # the sense's definition
  examples: tuple[str, ...]   # the sense's example sentences


def _parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
  examples = tuple(e.strip() for e in re.findall(r'"([^"]+)"', gloss)
                   if len(e.split()) >= 4)
  definition = re.sub(r';?\s*"[^"]*"', "", gloss).strip(" ;")
  return definition, examples


def _glosses(data_file: pathlib.Path) -> dict[int, str]:
  out = {}
  with open(data_file, encoding="utf-8", errors="replace") as f:
    for line in f:
      if line.startswith(" ") or "|" not in line:
        continue                    # the licence header
      head, gloss = line.split("|", 1)
      out[int(head.split(" ", 1)[0])] = gloss.strip()
  return out


@functools.lru_cache(maxsize=4)
def common_words(root: str) -> tuple[Word, ...]:
  """WordNet lemmas (nouns, verbs, adjectives) with a sense tagged in
  SemCor, each with its first (most frequent) sense, in index order.

  Raises:
    TextSourceError: WordNet's index or data files missing under `root`.
  """
  base = pathlib.Path(root, WORDNET)
  out = []
  for pos in POS:
    index, data = base / f"index.{pos}", base / f"data.{pos}"
    if not (index.is_file() and data.is_file()):
      raise TextSourceError(f"WordNet files {str(index)!r} / {str(data)!r} "
                            f"missing (fetch the 'wordnet' source)")
    glosses = _glosses(data)
    with open(index, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith(" "):
          continue
        fields = line.split()
        lemma, p_cnt = fields[0], int(fields[3])
        tagged = int(fields[5 + p_cnt])
        offsets = fields[6 + p_cnt:]
        if (tagged < 1 or not offsets or not lemma.isascii()
            or not re.fullmatch(r"[a-z][a-z_-]*", lemma)):
          continue
        gloss = glosses.get(int(offsets[0]))
        if gloss is None:
          continue
        definition, examples = _parse_gloss(gloss)
        out.append(Word(lemma.replace("_", " "), pos, definition, examples))
  if not out:
    raise TextSourceError(f"no tagged lemmas in {str(base)!r}")
  return tuple(out)


def default_cache_dir() -> str:
  """Where `make_drafter_data.py` keeps the unpacked packages."""
  return os.path.join(os.path.expanduser("~"), ".cache", "seqdec",
                      "offline_text")
