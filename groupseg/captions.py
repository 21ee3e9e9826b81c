"""Caption files shared by training (``make-shards``) and evaluation (Flickr retrieval).

The Flickr token format (Flickr8k ``Flickr8k.token.txt``, Flickr30k ``results_*.token``) is one
caption a line: ``IMAGE.jpg#K<TAB>caption``, K numbering an image's captions from 0.
"""
from __future__ import annotations

import re
from pathlib import Path

FLICKR_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<k>\d+)\t(?P<caption>.*)$")


def parse_flickr_line(line: str) -> tuple[str, int, str] | None:
    """``"a.jpg#2\\tA dog ."`` -> ``("a.jpg", 2, "A dog .")``; None for a line of another shape.

    >>> parse_flickr_line("1000268201_693b08cb0e.jpg#0\\tA child in a pink dress .")
    ('1000268201_693b08cb0e.jpg', 0, 'A child in a pink dress .')
    >>> parse_flickr_line("no tab here") is None
    True
    """
    m = FLICKR_LINE.match(line.rstrip("\r\n"))
    return None if m is None else (m["image"], int(m["k"]), m["caption"])


def read_flickr_captions(path: str | Path, bad_lines: list[tuple[int, str]] | None = None) -> dict[str, list[str]]:
    """Read a Flickr token file into ``{image name: [captions]}``.

    Images in the order of their first line, each image's captions in ``#K`` order, stripped of
    surrounding whitespace (empty captions are kept: the caller decides).

    Args:
        path: the token file (UTF-8, a BOM is ignored).
        bad_lines: if given, ``(line number, line)`` of every non-blank line that is not
            ``IMAGE#K<TAB>caption`` is appended to it (otherwise such lines are ignored).

    Raises:
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    rows: dict[str, list[tuple[int, str]]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parsed = parse_flickr_line(line)
            if parsed is None:
                if bad_lines is not None:
                    bad_lines.append((n, line.rstrip("\r\n")))
                continue
            image, k, caption = parsed
            rows.setdefault(image, []).append((k, caption.strip()))
    return {image: [c for _, c in sorted(caps, key=lambda kc: kc[0])] for image, caps in rows.items()}
