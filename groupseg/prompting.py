"""Prompt templates and vocabularies, read from the ``prompts/`` data folder or from user files."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


# the template set used when none is named (Segmenter, `groupseg segment`, eval, finetune)
DEFAULT_TEMPLATES = "simple"


def prompts_dir() -> Path:
    """The folder holding ``templates/`` and ``vocab/`` (installed as ``groupseg.prompts``)."""
    candidates = [Path(__file__).resolve().parent.parent / "prompts"]  # a source checkout
    try:
        import groupseg.prompts as p  # installed: prompts/ is mapped onto this package

        candidates = [Path(d) for d in p.__path__] + candidates
    except ImportError:
        pass
    for d in candidates:
        if (d / "templates").is_dir():
            return d
    raise FileNotFoundError("groupseg's prompts/ data folder is missing from this installation")


def list_templates() -> list[str]:
    return sorted(p.stem for p in (prompts_dir() / "templates").glob("*.txt"))


def load_templates(name_or_path: str) -> list[str]:
    """Templates, one per line with ``{}`` for the word: a shipped set name or a file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = prompts_dir() / "templates" / f"{name_or_path}.txt"
        if not path.is_file():
            raise ValueError(f"unknown template set {name_or_path!r}; shipped: {', '.join(list_templates())}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{path}: template without '{{}}': {bad[0]!r}")
    if not templates:
        raise ValueError(f"{path}: no templates")
    return templates


def parse_class(entry: str) -> list[str]:
    """``"person;pedestrian"`` -> ``["person", "pedestrian"]`` (the first name is the label)."""
    names = [n.strip() for n in entry.split(";") if n.strip()]
    if not names:
        raise ValueError(f"empty class name in {entry!r}")
    return names


def read_vocab_file(path: str | Path) -> list[str]:
    """A vocabulary file: one class per line, synonyms separated by ``;``, ``#`` comments."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    lines = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def shipped_vocab(name: str) -> list[str]:
    """A vocabulary shipped in ``prompts/vocab/NAME.txt``."""
    path = prompts_dir() / "vocab" / f"{name}.txt"
    if not path.is_file():
        names = sorted(p.stem for p in (prompts_dir() / "vocab").glob("*.txt"))
        raise ValueError(f"unknown vocabulary {name!r}; shipped: {', '.join(names)}")
    return read_vocab_file(path)


def normalize_vocab(words: str | Sequence[str]) -> list[str]:
    """Validate a vocabulary: a comma-separated string or a list of entries.

    Raises a one-line ``ValueError`` for an empty vocabulary or a duplicated class.
    """
    if isinstance(words, str):
        words = [w for w in words.split(",")]
    entries = [w.strip() for w in words if w and w.strip()]
    if not entries:
        raise ValueError("empty vocabulary: give at least one class name")
    seen: dict[str, str] = {}
    for e in entries:
        key = parse_class(e)[0].lower()
        if key in seen:
            raise ValueError(f"duplicate class {parse_class(e)[0]!r} in the vocabulary")
        seen[key] = e
    return entries
