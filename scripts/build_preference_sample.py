"""Rebuild ``platform/llmforge/sample_data/preferences.jsonl``: synthetic preference pairs about Debian commands.

Generated from the chat sample's templates (scripts/build_chat_sample.py; no outside text), seeded, so it is free
to ship. Each pair's ``chosen`` reply is the template's correct answer; ``rejected`` is, in turn:
- the answer to another task for the same package (``remove`` when asked to install, and so on);
- the correct answer's command for another package;
- an unhelpful reply that answers nothing.
About half the rows are plain strings, half TRL's conversational shape (message lists).
Usage: python scripts/build_preference_sample.py
"""

import json
import random
from pathlib import Path

from build_chat_sample import PACKAGES, TASKS

OUT = Path(__file__).resolve().parents[1] / "platform" / "llmforge" / "sample_data" / "preferences.jsonl"
UNHELPFUL = ["I am not able to help with that.", "Software can be installed in many ways.", "Please ask someone else.",
             "我无法回答这个问题。"]


def main() -> None:
    rng = random.Random(11)
    rows = []
    for i, p in enumerate(PACKAGES):
        for j, (question, answer) in enumerate(TASKS):
            chosen = answer.format(p=p)
            kind = (i + j) % 3
            if kind == 0:  # another task's answer for this package (same language)
                others = [a for q, a in TASKS if a != answer and (q.isascii() == question.isascii())]
                rejected = rng.choice(others).format(p=p) if others else rng.choice(UNHELPFUL)
            elif kind == 1:  # the right command for the wrong package
                rejected = answer.format(p=rng.choice([q for q in PACKAGES if q != p]))
            else:
                rejected = rng.choice(UNHELPFUL)
            prompt = question.format(p=p)
            if rng.random() < 0.5:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            else:
                rows.append({"prompt": [{"role": "user", "content": prompt}],
                             "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(rows)
    OUT.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
