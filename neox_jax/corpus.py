"""The training corpus: English prose from the Python documentation, as Debian ships it, split by page.

    apt-get install python3.11-doc          # the HTML docs, /usr/share/doc/python3.11-doc/html (PSF License v2)
    python -m neox_jax.corpus corpus/       # -> corpus/train.jsonl, corpus/heldout.jsonl

Each HTML page's main text (Sphinx's `role="main"` block) becomes one document: paragraphs, headings, list
items and table cells, one per line, inline code kept, code blocks (`<pre>`) and the index pages dropped,
since the aim is prose. A page is held out when the SHA-256 of its path (relative to the HTML root) falls in
the held-out fraction: the split depends on nothing but the page's name, so it is the same on every
machine, and no held-out page is ever trained on. The files are JSON Lines, one `{"name", "text"}` object
a document, in path order; `neox_jax.train` reads them.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from .cli import ArgumentParser

DEFAULT_DOCS = Path("/usr/share/doc/python3.11-doc/html")
HELD_OUT_PERCENT = 5
SKIPPED = re.compile(r"^(genindex.*|py-modindex|search|contents|_.*)")  # indexes and Sphinx's own folders

_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "td", "th", "div", "section", "pre",
           "blockquote", "tr", "caption", "table", "ul", "ol", "dl"}
_VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _MainText(html.parser.HTMLParser):
    """The text of the `role="main"` element, a line per block element, without code blocks or `¶` links."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0  # open elements inside the main block (0: outside it)
        self.skip_depth = 0  # open elements inside a skipped one (<pre>, a headerlink)
        self.lines: list[str] = []
        self.line: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            return
        attrs = dict(attrs)
        if self.depth == 0:
            if attrs.get("role") == "main":
                self.depth = 1
            return
        self.depth += 1
        if self.skip_depth:
            self.skip_depth += 1
        elif tag == "pre" or "headerlink" in (attrs.get("class") or "").split():
            self.skip_depth = 1
        if tag in _BLOCKS:
            self.end_line()

    def handle_endtag(self, tag):
        if tag in _VOID or self.depth == 0:
            return
        self.depth -= 1
        if self.skip_depth:
            self.skip_depth -= 1
        if tag in _BLOCKS:
            self.end_line()

    def handle_data(self, data):
        if self.depth and not self.skip_depth:
            self.line.append(data)

    def end_line(self):
        text = " ".join("".join(self.line).split())
        if text:
            self.lines.append(text)
        self.line = []


def page_text(html_text: str) -> str:
    parser = _MainText()
    parser.feed(html_text)
    parser.close()
    parser.end_line()
    return "\n".join(parser.lines)


def held_out(name: str, percent: int = HELD_OUT_PERCENT) -> bool:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100 < percent


def documents(docs: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every prose page under `docs`, in path order; empty pages are left out."""
    for path in sorted(docs.rglob("*.html")):
        name = path.relative_to(docs).as_posix()
        if any(SKIPPED.match(part.removesuffix(".html")) for part in Path(name).parts):
            continue
        text = page_text(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield name, text


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    """Written to a temporary file and renamed: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for name, text in docs:
                f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build(docs: Path, out: Path, percent: int = HELD_OUT_PERCENT) -> dict[str, int]:
    pages = list(documents(docs))
    if not pages:
        raise FileNotFoundError(f"{docs}: no HTML pages with a role=\"main\" block (install python3.11-doc?)")
    heldout = [page for page in pages if held_out(page[0], percent)]
    train = [page for page in pages if not held_out(page[0], percent)]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    return {"train": len(train), "heldout": len(heldout),
            "train_chars": sum(len(t) for _, t in train), "heldout_chars": sum(len(t) for _, t in heldout)}


def read_jsonl(path: Path) -> list[str]:
    """The texts of a corpus file, each line checked: errors name the file and line."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
                text = doc["text"]
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{number}: not a JSON object with a 'text' string ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: 'text' is {type(text).__name__}, expected a string")
            texts.append(text)
    return texts


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="python -m neox_jax.corpus", description=__doc__.split("\n\n")[0],
        epilog="Install the HTML first: apt-get install python3.11-doc (Debian 12). The Python documentation is "
               "under the PSF License Version 2, which allows derivative works such as a model trained on it.")
    p.add_argument("out", type=Path, help="directory to write train.jsonl and heldout.jsonl into")
    p.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help=f"the HTML root (default {DEFAULT_DOCS})")
    p.add_argument("--heldout-percent", type=int, default=HELD_OUT_PERCENT, choices=range(1, 100), metavar="P",
                   help=f"percent of pages held out, by path hash (default {HELD_OUT_PERCENT})")
    args = p.parse_args(argv)
    if not args.docs.is_dir():
        print(f"error: {args.docs}: no such directory (apt-get install python3.11-doc, or give --docs)",
              file=sys.stderr)
        return 2
    try:
        counts = build(args.docs, args.out, args.heldout_percent)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} training pages ({counts['train_chars']:,} characters), "
          f"{counts['heldout']} held out ({counts['heldout_chars']:,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
