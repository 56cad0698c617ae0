"""Rebuild ``platform/llmforge/sample_data/chat.jsonl``: synthetic chat and instruction records about Debian commands.

Everything is generated from the templates below (no outside text), seeded, so it is free to ship.
Usage: python scripts/build_chat_sample.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "platform" / "llmforge" / "sample_data" / "chat.jsonl"
PACKAGES = ["nginx", "vim", "git", "curl", "python3", "htop", "tmux", "rsync", "openssh-server", "postgresql",
            "redis-server", "gcc", "make", "zsh", "jq", "wget", "unzip", "docker.io", "nodejs", "sqlite3"]
TASKS = [
    ("How do I install {p}?", "Run `sudo apt install {p}`. APT downloads {p} and its dependencies and installs them."),
    ("How do I remove {p}?", "Run `sudo apt remove {p}`. Add `--purge` to delete its configuration files too."),
    ("Which version of {p} is installed?", "Run `apt policy {p}`. The line marked Installed shows the version of {p}."),
    ("安装 {p} 的命令是什么？", "使用 `sudo apt install {p}`，APT 会下载 {p} 及其依赖并完成安装。"),
]


def main() -> None:
    rng = random.Random(7)
    lines = []
    for p in PACKAGES:
        for q, a in TASKS:
            msgs = [{"role": "user", "content": q.format(p=p)}, {"role": "assistant", "content": a.format(p=p)}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "You are a concise Debian assistant."})
            lines.append(json.dumps({"messages": msgs}, ensure_ascii=False) if rng.random() < 0.7 else
                         json.dumps({"prompt": q.format(p=p), "completion": a.format(p=p)}, ensure_ascii=False))
    rng.shuffle(lines)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(lines)} records")


if __name__ == "__main__":
    main()
