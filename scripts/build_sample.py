"""Rebuild ``platform/llmforge/sample_data/corpus.jsonl.gz`` from the Debian Reference (English and Simplified Chinese).

The text is the Debian Reference by Osamu Aoki and its translators (GPL-2+, see platform/llmforge/sample_data/README.md),
taken from Debian's `debian-reference-en` and `debian-reference-zh-cn` packages:

    apt-get download debian-reference-en debian-reference-zh-cn
    for f in debian-reference-*.deb; do dpkg -x "$f" /tmp/debref; done
    python scripts/build_sample.py /tmp/debref/usr/share/debian-reference

Planted on top, all synthetic and seeded: PII (made-up emails, phones, valid-checksum IDs and cards,
IPs), exact and near duplicates, junk, a malformed line and records without text, so every step of
the pipeline has work to do.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "platform" / "llmforge" / "sample_data" / "corpus.jsonl.gz"
TARGET_CHARS = {"en": 1600, "zh": 700}


def documents(text: str, target: int) -> list[str]:
    """Group consecutive paragraphs into documents of about ``target`` characters."""
    paragraphs = [" ".join(p.split()) if "\n" not in p.strip() else p.strip() for p in text.split("\n\n")]
    docs, current = [], []
    for para in filter(None, (p.strip() for p in paragraphs)):
        current.append(para)
        if sum(len(p) for p in current) >= target:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def cn_id(rng: random.Random) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    body = f"{rng.choice([11, 31, 44, 51])}{rng.randint(1000, 9999)}{rng.randint(1960, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(100, 999)}"
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, weights)) % 11]


def card(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i:i + 4] for i in range(0, 16, 4))


def pii_sentence(rng: random.Random, lang: str) -> str:
    user = f"user{rng.randint(100, 999)}"
    phone = f"138{rng.randint(1000, 9999)}{rng.randint(1000, 9999)}"
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    if lang == "zh":
        return rng.choice([
            f"如有问题请联系管理员{user}@example.com或致电{phone}。",
            f"用户身份证号{cn_id(rng)}已登记，服务器地址{ip}。",
            f"付款银行卡号{card(rng)}，联系电话+86 {phone[:3]} {phone[3:7]} {phone[7:]}。",
        ])
    return rng.choice([
        f"Send questions to {user}@example.org or call +1 415 555 {rng.randint(1000, 9999)}.",
        f"The mirror at {ip} was configured by {user}@example.net.",
        f"Billing card {card(rng)} was charged; contact ops at 2001:db8::{rng.randint(1, 9999):x}.",
    ])


def near_copy(text: str, rng: random.Random) -> str:
    """Change a few words at one place: a near duplicate well above Jaccard 0.8."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i:i + 2] = ["(revised)", words[i]]
    return " ".join(words)


def main(src: Path) -> None:
    rng = random.Random(20261123)
    en = gzip.open(src / "debian-reference.en.txt.gz", "rt", encoding="utf-8").read()
    zh = gzip.open(src / "debian-reference.zh-cn.txt.gz", "rt", encoding="utf-8").read()
    docs = [("en", d) for d in documents(en, TARGET_CHARS["en"])] + [("zh", d) for d in documents(zh, TARGET_CHARS["zh"])]
    records = []
    for i, (lang, text) in enumerate(docs):
        if rng.random() < 0.12:
            text = text + "\n\n" + pii_sentence(rng, lang)
        records.append({"id": f"debref-{lang}-{i:05d}", "text": text, "lang": lang, "source": "debian-reference"})
    originals = [r for r in records if len(r["text"]) > 400]
    for j, r in enumerate(rng.sample(originals, 60)):
        records.append({**r, "id": f"{r['id']}-copy{j}"})
    for j, r in enumerate(rng.sample(originals, 60)):
        records.append({**r, "id": f"{r['id']}-near{j}", "text": near_copy(r["text"], rng)})
    junk = [
        "BUY NOW!!! " * 40,
        "$$$ %%% ### @@@ !!! *** ^^^ &&& ((( ))) " * 10,
        "\n".join(["Click here to subscribe"] * 30),
        "哈哈哈哈哈哈哈哈" * 40,
        "ok",
        "免费领取！！！" * 30,
    ]
    for j in range(40):
        records.append({"id": f"junk-{j:03d}", "text": junk[j % len(junk)], "source": "synthetic-junk"})
    rng.shuffle(records)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(5, '{"id": "broken-1", "text": "an unterminated record')
    lines.insert(50, json.dumps({"id": "no-text-1", "body": "the text is under the wrong key"}))
    lines.insert(90, json.dumps({"id": "no-text-2", "text": 42}))
    lines.insert(120, "[1, 2, 3]")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
