"""Rebuild the evaluation tasks shipped in ``platform/llmforge/evals/tasks/`` from the Debian Administrator's Handbook.

The text is *The Debian Administrator's Handbook* by Raphaël Hertzog and Roland Mas and its Simplified Chinese
translators (GPL-2+ or CC-BY-SA-3.0, see platform/llmforge/evals/tasks/README.md), from Debian's `debian-handbook`
package (version 11.20220922). It is held-out text for the sample corpus (the *Debian Reference*): same domain,
other authors, other sentences.

    apt-get download debian-handbook && dpkg -x debian-handbook_*.deb /tmp/handbook
    python scripts/build_eval_tasks.py /tmp/handbook/usr/share/doc/debian-handbook/html

Three tasks, seeded, so a rebuild gives the same files:

- ``handbook_ending_en`` / ``handbook_ending_zh`` (multiple choice, 4 endings): a sentence's beginning, then its
  true ending or the endings of three other sentences of about the same length from other chapters
  (HellaSwag's shape on real text). Chance is 25%.
- ``handbook_lastword_en`` (cloze, LAMBADA's shape): a paragraph without its last word, which also occurs
  earlier in the paragraph; scored by the log-likelihood of that word and whether greedy decoding gives it.
"""

from __future__ import annotations

import html
import json
import random
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "platform" / "llmforge" / "evals" / "tasks"
ITEMS = 300
SEED = 20261202


class Paragraphs(HTMLParser):
    """The text of each ``<div class="para">`` (DocBook's paragraphs), inline markup flattened."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.depth = 0  # div nesting inside the current paragraph; 0: outside one
        self.skip = 0  # inside <pre> (program listings are not prose)
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.skip += 1
        if tag != "div":
            return
        if self.depth:
            self.depth += 1
        elif "para" in (dict(attrs).get("class") or "").split():
            self.depth, self.text = 1, []

    def handle_endtag(self, tag):
        if tag == "pre":
            self.skip -= 1
        if tag == "div" and self.depth:
            self.depth -= 1
            if not self.depth:
                self.paragraphs.append(" ".join("".join(self.text).split()))

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.text.append(data)


def chapters(root: Path) -> dict[str, list[str]]:
    out = {}
    for page in sorted(root.glob("*.html")):
        parser = Paragraphs()
        parser.feed(page.read_text(encoding="utf-8"))
        out[page.stem] = [html.unescape(p) for p in parser.paragraphs if p]
    return out


def sentences(paragraph: str, lang: str) -> list[str]:
    if lang == "zh":
        return [s for s in re.findall(r"[^。！？]+[。！？]", paragraph)]
    return re.split(r"(?<=[a-z][.!?])\s+(?=[A-Z])", paragraph)


def usable(sentence: str, lang: str) -> bool:
    if lang == "zh":
        cjk = len(re.findall(r"[\u4e00-\u9fff]", sentence))
        return 24 <= len(sentence) <= 80 and cjk >= 0.6 * len(sentence)
    words = sentence.split()
    return 12 <= len(words) <= 36 and sentence[-1] in ".!?" and not re.search(r"[/<>{}=$]|\.\.", sentence)


def split(sentence: str, lang: str) -> tuple[str, str]:
    """(beginning, ending): about the first 55% of the words (characters in Chinese)."""
    if lang == "zh":
        cut = round(len(sentence) * 0.55)
        return sentence[:cut], sentence[cut:]
    words = sentence.split()
    cut = round(len(words) * 0.55)
    return " ".join(words[:cut]), " ".join(words[cut:])


def ending_task(root: Path, lang: str, rng: random.Random) -> list[dict]:
    pool = []  # (chapter, beginning, ending)
    for chapter, paragraphs in chapters(root).items():
        for paragraph in paragraphs:
            pool += [(chapter, *split(s, lang)) for s in sentences(paragraph, lang) if usable(s, lang)]
    size = (lambda text: len(text)) if lang == "zh" else (lambda text: len(text.split()))
    rng.shuffle(pool)
    items, used = [], set()
    for chapter, beginning, ending in pool:
        if len(items) == ITEMS:
            break
        if ending in used:
            continue
        others = [e for c, _, e in pool if c != chapter and abs(size(e) - size(ending)) <= 2 and e != ending
                  and e not in used]
        if len(others) < 3:
            continue
        distractors = rng.sample(others, 3)
        choices = [ending, *distractors]
        rng.shuffle(choices)
        used.update(choices)
        items.append({"id": f"{lang}-{len(items):03d}", "source": chapter, "context": beginning,
                      "choices": choices, "label": choices.index(ending)})
    return items


def lastword_task(root: Path, rng: random.Random) -> list[dict]:
    pool = []
    for chapter, paragraphs in chapters(root).items():
        for paragraph in paragraphs:
            words = paragraph.split()
            match = re.fullmatch(r"([A-Za-z]{4,})[.!?]", words[-1]) if words else None
            if not (30 <= len(words) <= 90 and match):
                continue
            word, head = match.group(1), " ".join(words[:-1])
            if re.search(rf"\b{word}\b", head) and not re.search(r"[<>{}=$]", paragraph):
                pool.append({"source": chapter, "context": head, "target": word})
    rng.shuffle(pool)
    return [{"id": f"en-{i:03d}", **item} for i, item in enumerate(pool[:ITEMS])]


def write(name: str, items: list[dict]) -> None:
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} items", file=sys.stderr)


def main(html_root: str) -> None:
    root = Path(html_root)
    OUT.mkdir(parents=True, exist_ok=True)
    write("handbook_ending_en", ending_task(root / "en-US", "en", random.Random(SEED)))
    write("handbook_ending_zh", ending_task(root / "zh-CN", "zh", random.Random(SEED + 1)))
    write("handbook_lastword_en", lastword_task(root / "en-US", random.Random(SEED + 2)))


if __name__ == "__main__":
    main(sys.argv[1])
