import pytest

from llmforge.config import TokenizerConfig
from llmforge.data.tokenizer import train_tokenizer
from llmforge.train.lora import IGNORE, pack_examples, render, to_messages


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("tok")
    texts = ["How do I install nginx? Run sudo apt install nginx.", "安装软件包的命令是什么？使用 apt install。"] * 50
    train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1), out, model_max_length=256)
    return AutoTokenizer.from_pretrained(out)


def test_to_messages_formats_and_errors():
    msgs, err = to_messages({"prompt": "p", "completion": "c"})
    assert err is None and [m["role"] for m in msgs] == ["user", "assistant"]
    assert to_messages({"messages": [{"role": "user", "content": "hi"}]})[1] == "no assistant message"
    assert "role" in to_messages({"messages": [{"role": "bot", "content": "x"}]})[1]
    assert to_messages({"text": "x"})[1].startswith("neither")
    assert to_messages([1, 2])[1] == "not a JSON object"


def test_labels_cover_only_assistant_replies(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I install nginx?"},
                {"role": "assistant", "content": "Run sudo apt install nginx."},
                {"role": "user", "content": "安装？"}, {"role": "assistant", "content": "使用 apt install。"}]
    ids, labels = render(messages, tok, 256)
    assert len(ids) == len(labels)
    learned = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert learned == "Run sudo apt install nginx.<|im_end|>\n使用 apt install。<|im_end|>\n"
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))


def test_too_long_is_rejected(tok):
    long = [{"role": "user", "content": "install " * 200}, {"role": "assistant", "content": "ok"}]
    assert render(long, tok, 32).startswith("too_long")


def test_pack_examples_keeps_examples_whole():
    rows = pack_examples([([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8], [6, IGNORE, 8])], 6, 0)
    assert rows == [([1, 2, 3, 4, 5, 0], [IGNORE, 2, 3, 4, 5, IGNORE]), ([6, 7, 8, 0, 0, 0], [6, IGNORE, 8, IGNORE, IGNORE, IGNORE])]
