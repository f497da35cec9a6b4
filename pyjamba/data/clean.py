"""Cleaning of Jane Austen's novels as Project Gutenberg prints them (janeaustenr's text) into the
training corpus: one chapter per document, one paragraph per line.

The cleaned format, for every novel:
- documents are separated by one blank line; a document is a chapter (or the author's preface,
  Northanger Abbey's "Advertisement"), and starts with its heading line: `Chapter 12`, preceded by
  `Volume 2` on the first chapter of a volume (Emma); numbers are arabic whatever the source uses;
- each paragraph is one line: the hard-wrapped lines joined with a space, or with nothing after a
  line that ends in a dash `--` (the wrap broke at the dash, which the texts write closed up);
- verse, letter headings and signatures (indented blocks whose lines do not run on as prose) keep
  one line per printed line; scene breaks (`* * * * *`, `***`) become `* * *`;
- the `_italics_` marks are removed; curly quotes become straight ones; runs of spaces become one.

Dropped: the title block before the first heading, the closing `THE END` / `FINIS`, bracketed
notes about editions (`[End volume one of this edition. ...]`) and the editor's "A NOTE ON THE
TEXT" at the end of Northanger Abbey. The author's one footnote (Northanger Abbey, chapter 3) moves
from the end of the book to the line after the paragraph that calls it. Nothing else is changed:
spelling, punctuation and the capitals some texts use for emphasis stay as printed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pyjamba.data.files import DataError, atomic_write_text, sha256_file

__all__ = ["CleanedNovel", "clean_austen", "clean_novel"]

COPYRIGHT_FILE = "COPYRIGHT.debian"
SCENE_BREAK = "* * *"

_CHARACTERS = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\u00a0": " ", "\t": " ", "\ufeff": "",
    }
)  # fmt: skip
_CHAPTER = re.compile(r"chapter\s+([ivxlc]+|\d+)\.?", re.IGNORECASE)
_VOLUME = re.compile(r"volume\s+([ivxlc]+|\d+)\.?", re.IGNORECASE)
_PREFACE = re.compile(r"(ADVERTISEMENT|PREFACE)\b[^a-z]*")
_END = re.compile(r"(THE END|FINIS)\.?", re.IGNORECASE)
_EDITOR_END = "A NOTE ON THE TEXT"
_SCENE_BREAK = re.compile(r"\*(\s*\*)+")
_FOOTNOTE = re.compile(r"\*\w.*")
_FOOTNOTE_CALL = re.compile(r"\w[,.;:!?]?\*(?=\s|$)")
_LINE_START = re.compile(r"[\"']*[A-Z]")
_SMALL_WORDS = frozenset({"a", "an", "and", "by", "in", "of", "on", "the", "to"})
_ROMAN = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}


@dataclass
class CleanedNovel:
    """One novel's cleaned text and what the cleaning found in it."""

    text: str
    documents: int
    chapters: int
    paragraphs: int


def _number(numeral: str) -> int:
    """An arabic or roman numeral's value."""
    if numeral.isdigit():
        return int(numeral)
    values = [_ROMAN[c] for c in numeral.lower()]
    return sum(-v if v < after else v for v, after in zip(values, [*values[1:], 0], strict=True))


def _title_case(heading: str) -> str:
    words = heading.lower().split()
    return " ".join(
        w if i and w.strip(",.;:") in _SMALL_WORDS else w[:1].upper() + w[1:] for i, w in enumerate(words)
    )


def _spaces(line: str) -> str:
    return " ".join(line.split())


def _is_verse(block: list[str]) -> bool:
    """A block with indented lines that do not run on as prose: verse, a letter's heading or signature.

    Indented prose (the letters in Sense and Sensibility) has one indent and lines that continue
    sentences in lower case; verse and signatures vary their indent or start every line anew.
    """
    if not any(line[:1].isspace() for line in block):
        return False
    indents = {len(line) - len(line.lstrip()) for line in block}
    return len(indents) > 1 or all(_LINE_START.match(line.lstrip()) for line in block[1:])


def _join(block: list[str]) -> str:
    """A hard-wrapped paragraph as one line: a space between lines, none after a closing `--`."""
    text = ""
    for line in (_spaces(line) for line in block):
        text += line if not text or text.endswith("--") else " " + line
    return text


def _is_edition_note(block: list[str]) -> bool:
    """`[End volume one of this edition. ...]`: an editor's bracketed note about the printed books."""
    text = _join(block)
    return text.startswith("[") and text.endswith("]") and "edition" in text.lower()


def _blocks(text: str) -> list[list[str]]:
    """Runs of non-blank lines, indentation kept."""
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip():
            blocks[-1].append(line.rstrip())
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def clean_novel(raw: str) -> CleanedNovel:
    """Clean one novel's Gutenberg text into the format of this module's docstring.

    Raises DataError for a text in which no chapter heading is found.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n").translate(_CHARACTERS).replace("_", "")
    lines = text.split("\n")
    end = next((i for i, line in enumerate(lines) if line.strip() == _EDITOR_END), len(lines))
    documents: list[list[str]] = []
    volume: list[str] = []  # a volume heading waiting for its first chapter
    footnotes: list[tuple[int, str]] = []  # (documents before it, text)
    chapters = 0
    for block in _blocks("\n".join(lines[:end])):
        single = _spaces(block[0]) if len(block) == 1 else None
        if single is not None and (m := _VOLUME.fullmatch(single)):
            volume = [f"Volume {_number(m.group(1))}"]
        elif single is not None and (m := _CHAPTER.fullmatch(single)):
            documents.append([*volume, f"Chapter {_number(m.group(1))}"])
            volume = []
            chapters += 1
        elif single is not None and not documents and _PREFACE.fullmatch(single):
            documents.append([_title_case(single)])
        elif not documents or (single is not None and _END.fullmatch(single)):
            continue  # the title block before the first heading; the closing THE END / FINIS
        elif _is_edition_note(block):
            continue
        elif single is not None and _SCENE_BREAK.fullmatch(single):
            documents[-1].append(SCENE_BREAK)
        elif single is not None and _FOOTNOTE.fullmatch(single):
            footnotes.append((len(documents), single))
        elif _is_verse(block):
            documents[-1].extend(_spaces(line) for line in block)
        else:
            documents[-1].append(_join(block))
    if not chapters:
        raise DataError("no chapter headings ('CHAPTER I', 'Chapter 1') found")
    for count, note in footnotes:
        _place_footnote(documents[:count], note)
    paragraphs = sum(len(doc) - 1 for doc in documents)
    return CleanedNovel(
        text="\n\n".join("\n".join(doc) for doc in documents) + "\n",
        documents=len(documents),
        chapters=chapters,
        paragraphs=paragraphs,
    )


def _place_footnote(documents: list[list[str]], note: str) -> None:
    """Put a footnote on the line after the last paragraph (before it) that calls it with `*`."""
    for doc in reversed(documents):
        for i in range(len(doc) - 1, -1, -1):
            if _FOOTNOTE_CALL.search(doc[i]):
                doc.insert(i + 1, note)
                return
    documents[-1].append(note)  # no call found: the note stays where the book prints it


def clean_austen(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, dict]:
    """Clean every `*.txt` novel in `src_dir` into `out_dir` (same file names), and copy its
    `COPYRIGHT.debian`. Other files in `out_dir` (a README) are left alone; each file is written
    atomically. Returns, per file name, the raw and cleaned sha256 and the counts found.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    novels = sorted(p for p in src.glob("*.txt") if p.is_file())
    if not novels:
        raise DataError(f"{src}: folder holds no .txt files")
    copyright_file = src / COPYRIGHT_FILE
    if not copyright_file.is_file():
        raise DataError(f"{copyright_file}: missing; the cleaned text must ship with its licence")
    if out.resolve() == src.resolve():
        raise DataError(f"{out}: the output folder must differ from the source folder")
    report = {}
    for path in novels:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
        try:
            novel = clean_novel(raw)
        except DataError as e:
            raise DataError(f"{path}: {e}") from e
        atomic_write_text(out / path.name, novel.text)
        report[path.name] = {
            "raw_sha256": sha256_file(path),
            "sha256": sha256_file(out / path.name),
            "documents": novel.documents,
            "chapters": novel.chapters,
            "paragraphs": novel.paragraphs,
            "words": len(novel.text.split()),
        }
    atomic_write_text(out / COPYRIGHT_FILE, copyright_file.read_text(encoding="utf-8"))
    return report
