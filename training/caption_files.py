"""Captions files for ``make-shards``: format detection and one reader per format.

Formats: CSV/TSV with a header naming ``image`` and ``caption`` columns (delimiter detected),
JSON lines (``{"image": ..., "caption": ...}`` or ``"captions": [...]``), COCO
``captions_*.json`` and the Flickr ``*.token.txt`` format (``IMAGE.jpg#K<TAB>caption``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Literal

from groupseg.captions import parse_flickr_line, read_flickr_captions

CaptionFormat = Literal["auto", "csv", "tsv", "jsonl", "coco", "flickr"]
FORMATS = ("auto", "csv", "tsv", "jsonl", "coco", "flickr")
# Header names accepted for the two columns of a CSV/TSV captions file (first match wins).
IMAGE_COLUMNS = ("image", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text")


def detect_format(path: str | Path) -> str:
    """Guess a captions file's format from its name and first line.

    Args:
        path: the captions file.

    Returns:
        One of ``csv``, ``tsv``, ``jsonl``, ``coco``, ``flickr``.
    """
    path = Path(path)
    name = path.name.lower()
    head = _first_line(path)
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        try:
            first = json.loads(head)
        except ValueError:
            return "coco"  # a multi-line JSON document
        if isinstance(first, dict) and ("annotations" in first or "images" in first):
            return "coco"
        return "jsonl"
    if parse_flickr_line(head) is not None:
        return "flickr"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if head.lstrip().startswith("{"):
        return "jsonl"
    if _table_delimiter(head) is not None:
        return "tsv" if "\t" in head else "csv"
    raise ValueError(f"cannot tell the format of captions file {path}; pass --format csv|tsv|jsonl|coco|flickr")


def read_captions(path: str | Path, fmt: str = "auto") -> tuple[dict[str, list[str]], list[dict], str]:
    """Read a captions file into ``{image name: [captions]}`` (order of first appearance).

    Args:
        path: the captions file.
        fmt: ``auto`` or one of ``csv``, ``tsv``, ``jsonl``, ``coco``, ``flickr``.

    Returns:
        ``(captions, bad_rows, fmt)``: the grouped captions, a list of ``{"line", "error"}``
        for rows that could not be used, and the format actually read.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown format, or no usable caption in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown captions format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    reader = {"csv": _read_table, "tsv": _read_table, "jsonl": _read_jsonl, "coco": _read_coco, "flickr": _read_flickr}[fmt]
    groups: dict[str, list[str]] = {}
    bad: list[dict] = []
    for line, image, caption in reader(path, fmt):
        if image is None:
            bad.append({"line": line, "error": caption})
            continue
        caption = " ".join(str(caption).split())
        image = str(image).strip()
        if not image or not caption:
            bad.append({"line": line, "error": "empty image name or caption"})
            continue
        groups.setdefault(image, []).append(caption)
    if not groups:
        raise ValueError(f"no usable captions in {path} (read as {fmt}); check --format")
    return groups, bad, fmt


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    raise ValueError(f"captions file is empty: {path}")


def _table_delimiter(header: str, prefer: str = ",") -> str | None:
    """The delimiter that splits ``header`` into an image and a caption column."""
    for delim in (prefer, ",", "\t", ";", "|"):
        cols = [c.strip().lower() for c in header.split(delim)]
        if any(c in cols for c in IMAGE_COLUMNS) and any(c in cols for c in CAPTION_COLUMNS):
            return delim
    return None


def _read_table(path: Path, fmt: str) -> Iterator[tuple]:
    header = _first_line(path)
    delim = _table_delimiter(header, prefer="\t" if fmt == "tsv" else ",")
    if delim is None:
        raise ValueError(
            f"{path}: the header {header[:80]!r} needs an image column ({'/'.join(IMAGE_COLUMNS)}) "
            f"and a caption column ({'/'.join(CAPTION_COLUMNS)})"
        )
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter=delim)
        cols = [c.strip().lower() for c in next(rows)]
        i_img = next(cols.index(c) for c in IMAGE_COLUMNS if c in cols)
        i_cap = next(cols.index(c) for c in CAPTION_COLUMNS if c in cols)
        for row in rows:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(i_img, i_cap):
                yield rows.line_num, None, f"expected {len(cols)} columns, got {len(row)}"
                continue
            yield rows.line_num, row[i_img], row[i_cap]


def _read_jsonl(path: Path, fmt: str) -> Iterator[tuple]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image = rec.get("image", rec.get("file_name"))
                caps = rec["captions"] if "captions" in rec else [rec["caption"]]
            except (ValueError, KeyError, AttributeError, TypeError) as exn:
                yield n, None, f"not a JSON object with image and caption: {type(exn).__name__}"
                continue
            if image is None or not isinstance(caps, list):
                yield n, None, "missing image or caption"
                continue
            for cap in caps:
                yield n, image, cap


def _read_coco(path: Path, fmt: str) -> Iterator[tuple]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        names = {img["id"]: img["file_name"] for img in doc["images"]}
        anns = doc["annotations"]
    except (ValueError, KeyError, TypeError) as exn:
        raise ValueError(f"{path} is not a COCO captions file (needs images[].id/file_name and annotations[]): {exn}") from None
    by_image: dict = {}
    for n, ann in enumerate(anns):
        if not isinstance(ann, dict) or ann.get("image_id") not in names or "caption" not in ann:
            yield n, None, "annotation without a known image_id or a caption"
            continue
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    for image_id, name in names.items():  # images in the file's order
        for cap in by_image.get(image_id, ()):
            yield image_id, name, cap


def _read_flickr(path: Path, fmt: str) -> Iterator[tuple]:
    bad: list[tuple[int, str]] = []
    groups = read_flickr_captions(path, bad)
    for n, _ in bad:
        yield n, None, "not IMAGE#K<TAB>caption"
    for image, caps in groups.items():
        for cap in caps:
            yield None, image, cap


def read_split_file(path: str | Path) -> set[str]:
    """Image names, one a line (``#`` comments and blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:
        return {ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")}
