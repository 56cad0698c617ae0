"""Build ``tests/data/filter_set.jsonl.gz``: real text of several kinds, labelled, for calibrating the filters.

Each record is ``{"id", "kind", "label", "source", "text"}``; ``label`` is ``good`` for real text a corpus
should keep and ``junk`` for the spam the quality filter exists to drop. Every good text comes from a Debian
package under a free licence (the provenance, package by package, is in ``tests/data/README.md``); the junk
is made here, seeded, from templates. The set is sampled (seeded) to a few hundred documents per kind so it
stays small enough to ship.

Rebuild (downloads the Debian packages into a scratch directory, needs ``apt-get``)::

    mkdir -p /tmp/filterset && cd /tmp/filterset && \\
      apt-get download fortunes fortunes-zh python3.11-doc debian-faq doc-debian debian-reference-en \\
        debian-reference-zh-cn && \\
      for f in *.deb; do dpkg-deb -x "$f" root; done
    python scripts/build_filter_set.py /tmp/filterset/root
"""

from __future__ import annotations

import gzip
import html.parser
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "filter_set.jsonl.gz"
PER_KIND = 250
MIN_CHARS = 50  # DataConfig.min_chars: shorter texts are rejected before any other filter, so they calibrate nothing
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fortunes(path: Path) -> list[str]:
    """The entries of a fortune(6) file (separated by ``%`` lines), colour codes removed."""
    text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    return [e.strip("\n") for e in re.split(r"^%\s*$", text, flags=re.M) if e.strip()]


def documents(text: str, target: int) -> list[str]:
    """Consecutive paragraphs grouped into documents of about ``target`` characters."""
    docs, current = [], []
    for para in filter(None, (p.strip() for p in re.split(r"\n\s*\n", text))):
        current.append(para)
        if sum(len(p) for p in current) >= target:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


class _HtmlText(html.parser.HTMLParser):
    """The text of a Sphinx page's body: paragraphs and code blocks, one block per paragraph."""

    BLOCKS = {"p", "pre", "dt", "dd", "li", "h1", "h2", "h3", "h4", "div", "table", "tr"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.depth = 0  # inside <div role="main">
        self.pre = 0
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.depth += tag == "div"
        elif tag == "div" and attrs.get("role") == "main":
            self.depth = 1
        if tag in ("script", "style"):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if self.depth and tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if self.depth and tag in self.BLOCKS:
            self.parts.append("\n\n")
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        text = "".join(self.parts).replace("¶", "")
        return re.sub(r"\n{3,}", "\n\n", text)


def code_docs(root: Path) -> list[str]:
    docs = []
    for page in sorted((root / "usr/share/doc/python3.11/html/library").glob("*.html")):
        parser = _HtmlText()
        parser.feed(page.read_text(encoding="utf-8"))
        docs += documents(parser.text(), 1200)
    return docs


def debian_prose(root: Path) -> list[str]:
    import gzip as gz
    texts = []
    faq = gz.open(root / "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "rt", encoding="utf-8").read()
    texts.append(faq[re.search(r"^Chapter\W+1\.\W+Definitions", faq, flags=re.M).start():])  # after the contents
    for name in ("social-contract.1.0.txt.gz", "constitution.1.6.txt.gz"):
        texts.append(gz.open(root / "usr/share/doc/debian" / name, "rt", encoding="utf-8").read())
    docs = []
    for text in texts:  # the FAQ's text is wrapped at 72 columns: unwrap paragraphs into lines
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        docs += documents("\n\n".join(paragraphs), 800)
    return docs


def manual(root: Path, name: str, target: int) -> list[str]:
    """The Debian Reference in documents of the sample corpus's sizes: prose, commands and ASCII tables."""
    import gzip as gz
    return documents(gz.open(root / "usr/share/debian-reference" / name, "rt", encoding="utf-8").read(), target)


def junk(rng: random.Random, n: int, prose: list[str]) -> list[str]:
    """Spam of the kinds the quality filter is for: repeated phrases, symbol soup, repeated lines, keyword lists,
    and real prose with a phrase stuffed after it."""
    phrases = ["BUY NOW!!!", "Click here to subscribe", "免费领取！！！", "哈哈哈哈", "best cheap replica watches",
               "点击这里立即下载", "free download full version crack", "follow me follow me", "加微信领红包"]
    symbols = "$%#@!*^&()[]{}<>|~=+-_/\\:;"
    out = []
    for i in range(n):
        kind = i % 6
        phrase = rng.choice(phrases)
        if kind == 0:  # one phrase repeated
            out.append(" ".join([phrase] * rng.randint(15, 60)))
        elif kind == 1:  # symbol soup
            out.append(" ".join("".join(rng.choice(symbols) for _ in range(rng.randint(2, 5)))
                                for _ in range(rng.randint(40, 120))))
        elif kind == 2:  # the same line many times
            out.append("\n".join([phrase] * rng.randint(10, 40)))
        elif kind == 3:  # a keyword list cycled
            words = rng.sample(phrases, 3)
            out.append(", ".join(words[j % 3] for j in range(rng.randint(30, 80))))
        elif kind == 4:  # a template line with a counter: "page 1 ... page N"
            out.append("\n".join(f"{phrase} page {j} {phrase}" for j in range(rng.randint(10, 40))))
        else:  # keyword stuffing after a real paragraph
            out.append(rng.choice(prose).split("\n\n")[0] + " " + " ".join([phrase] * rng.randint(20, 40)))
    return out


def main(root: Path) -> None:
    games = root / "usr/share/games/fortunes"
    kinds = {
        "prose": ("debian-faq 11.1, doc-debian 11.3 (social contract, constitution)", debian_prose(root)),
        "poetry": ("fortunes 1.99.1 songs-poems", fortunes(games / "songs-poems")),
        "code_docs": ("python3.11-doc 3.11.2 library reference", code_docs(root)),
        "manual": ("debian-reference-en, debian-reference-zh-cn 2.100 (with ASCII tables)",
                   manual(root, "debian-reference.en.txt.gz", 1600) + manual(root, "debian-reference.zh-cn.txt.gz", 700)),
        "chinese_prose": ("fortunes-zh 2.98 chinese", fortunes(games / "chinese")),
        "chinese_poetry": ("fortunes-zh 2.98 tang300, song100", fortunes(games / "tang300") + fortunes(games / "song100")),
        "forum": ("fortunes 1.99.1 linux, computers, news (Usenet and IRC posts)",
                  fortunes(games / "linux") + fortunes(games / "computers") + fortunes(games / "news")),
    }
    records = []
    for kind, (source, texts) in kinds.items():
        texts = sorted(set(t for t in texts if len(" ".join(t.split())) >= MIN_CHARS))
        pick = random.Random(f"{kind}-20")  # one stream per kind: adding a kind changes no other kind's sample
        for i, text in enumerate(sorted(pick.sample(texts, min(PER_KIND, len(texts))))):
            records.append({"id": f"{kind}-{i:03d}", "kind": kind, "label": "good", "source": source, "text": text})
    for i, text in enumerate(junk(random.Random("junk-20"), 120, kinds["prose"][1])):
        records.append({"id": f"junk-{i:03d}", "kind": "junk", "label": "junk", "source": "synthetic", "text": text})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{OUT}: {len(records)} records, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
