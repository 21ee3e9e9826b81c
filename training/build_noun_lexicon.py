"""Build ``prompts/lexicon/nouns.tsv.gz``, the offline lexicon behind ``groupseg.training.nouns``.

The lexicon is made from WordNet 3.0 as Debian ships it (``apt-get install wordnet-base``
puts it in ``/usr/share/wordnet``). It is built once by a developer and committed; the
runtime code only reads the gzipped file.

File format (UTF-8 text, gzipped; ``#`` lines are comments, fields are tab-separated):

- ``## words`` section: ``word  n  v  a  r`` for every single-word lemma (letters only,
  length >= 2). Each part-of-speech field is ``-`` when WordNet has no such lemma, else the
  number of times the lemma was sense-tagged with that part of speech in the SemCor corpus
  (summed over senses, from ``cntlist.rev``; ``0`` when present but never tagged). Satellite
  adjectives count as adjectives.
- ``## noun.exc``, ``## verb.exc``, ``## adj.exc`` sections: ``inflected  lemma`` pairs from
  WordNet's exception lists (``children  child``, ``ran  run``, ``better  good``), single words
  only.

Example:
    python training/build_noun_lexicon.py --wordnet /usr/share/wordnet \\
        --out prompts/lexicon/nouns.tsv.gz
"""
from __future__ import annotations

import argparse
import gzip
import re
from collections import defaultdict
from pathlib import Path

POS = ("n", "v", "a", "r")
INDEX_FILES = {"n": "index.noun", "v": "index.verb", "a": "index.adj", "r": "index.adv"}
EXC_FILES = ("noun.exc", "verb.exc", "adj.exc")
# cntlist.rev sense keys carry a synset type digit: 1 noun, 2 verb, 3 adj, 4 adv, 5 satellite adj.
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
WORD = re.compile(r"^[a-z]{2,}$")


def read_index(path: Path) -> set[str]:
    """Single-word lemmas of one ``index.POS`` file (license header lines start with spaces)."""
    words = set()
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line or line.startswith(" "):
            continue
        lemma = line.split(" ", 1)[0]
        if WORD.match(lemma):
            words.add(lemma)
    return words


def read_counts(path: Path) -> dict[tuple[str, str], int]:
    """SemCor tag counts per (lemma, pos) from ``cntlist.rev`` (``key sense_number count``)."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) != 3 or "%" not in parts[0]:
            continue
        lemma, rest = parts[0].split("%", 1)
        pos = SS_TYPE.get(rest[:1])
        if pos and WORD.match(lemma):
            counts[lemma, pos] += int(parts[2])
    return counts


def read_exc(path: Path) -> list[tuple[str, str]]:
    """``inflected lemma`` pairs; lines with several lemmas keep the first one."""
    pairs = []
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) >= 2 and WORD.match(parts[0]) and WORD.match(parts[1]) and parts[0] != parts[1]:
            pairs.append((parts[0], parts[1]))
    return pairs


def build(wordnet_dir: Path, out: Path) -> tuple[int, int]:
    """Write the lexicon; returns (number of words, size in bytes)."""
    missing = [f for f in (*INDEX_FILES.values(), *EXC_FILES, "cntlist.rev") if not (wordnet_dir / f).is_file()]
    if missing:
        raise SystemExit(f"WordNet file {wordnet_dir / missing[0]} not found: apt-get install wordnet-base")
    lemmas = {pos: read_index(wordnet_dir / name) for pos, name in INDEX_FILES.items()}
    counts = read_counts(wordnet_dir / "cntlist.rev")
    words = sorted(set().union(*lemmas.values()))

    lines = [
        "# groupseg noun lexicon, made by training/build_noun_lexicon.py from WordNet 3.0",
        "# (Princeton University, WordNet 3.0 license: https://wordnet.princeton.edu/license-and-commercial-use)",
        "# words: word, then per part of speech n v a r: SemCor tag count, '-' when absent",
        "## words",
    ]
    for w in words:
        fields = [str(counts.get((w, p), 0)) if w in lemmas[p] else "-" for p in POS]
        lines.append("\t".join([w, *fields]))
    for name in EXC_FILES:
        lines.append(f"## {name}")
        lines.extend(f"{a}\t{b}" for a, b in read_exc(wordnet_dir / name))
    out.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime=0 makes the gzip bytes depend on the content only (reproducible builds).
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    return len(words), out.stat().st_size


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="example: python training/build_noun_lexicon.py --wordnet /usr/share/wordnet",
    )
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=root / "prompts" / "lexicon" / "nouns.tsv.gz")
    args = parser.parse_args(argv)
    n, size = build(args.wordnet, args.out)
    print(f"wrote {args.out}: {n} words, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
