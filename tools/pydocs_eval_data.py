"""The lm-eval data of the pydocs tasks (tests/data/pydocs_*.yaml): passages of the corpus's held-out pages.

    python -m neox_jax.corpus corpus/                    # after apt-get install python3.11-doc
    python tools/pydocs_eval_data.py corpus/             # -> tests/data/pydocs_heldout.jsonl

A passage is one paragraph of a held-out page (`neox_jax.corpus`: never trained on) of 20 to 80 words that
ends in a plain word and a full stop, the stop dropped, so its last word is a LAMBADA-style target; as in
LAMBADA, where people chose passages whose last word the whole passage makes guessable, the word must occur
earlier in the passage. Every such paragraph is kept, in the corpus's page order: the file depends on nothing
but the corpus, so it is the same on every machine. Each line is `{"name", "text"}` (name: the page). The text is the Python
documentation's, under the PSF License Version 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from neox_jax.corpus import write_jsonl

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "pydocs_heldout.jsonl"
MIN_WORDS, MAX_WORDS = 20, 80
LAST_WORD = re.compile(r"[A-Za-z]+\.")


def passages(pages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(page, paragraph without its full stop) for each paragraph that qualifies, in page order."""
    found = []
    for name, text in pages:
        for paragraph in text.split("\n"):
            words = paragraph.split(" ")
            if MIN_WORDS <= len(words) <= MAX_WORDS and LAST_WORD.fullmatch(words[-1]) and \
                    words[-1][:-1] in words[:-1]:
                found.append((name, paragraph[:-1]))
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/pydocs_eval_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path, help="python -m neox_jax.corpus's output directory (its heldout.jsonl)")
    p.add_argument("--out", type=Path, default=OUT, help="default %(default)s")
    args = p.parse_args(argv)
    source = args.corpus / "heldout.jsonl"
    if not source.is_file():
        print(f"error: {source}: not found (build the corpus first: python -m neox_jax.corpus {args.corpus})",
              file=sys.stderr)
        return 2
    pages = [(doc["name"], doc["text"]) for doc in map(json.loads, source.read_text(encoding="utf-8").splitlines())]
    kept = passages(pages)
    write_jsonl(args.out, kept)
    print(f"{args.out}: {len(kept)} passages from {len({name for name, _ in kept})} held-out pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
