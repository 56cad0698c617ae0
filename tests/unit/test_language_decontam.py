"""Language identification and decontamination, the pure parts."""

import json

import pytest

from llmforge.config import load_config
from llmforge.data.decontam import EvalNgrams, decontaminate_batch, eval_items
from llmforge.data.language import identify, language_batch
from llmforge.errors import InputError

EN = "To remove a package and its configuration files, use apt purge followed by the package name."
ZH = "删除软件包及其配置文件可以使用清除命令，这个命令在系统上很常用，请先备份重要的数据。"
DE = "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft im Garten."
MIXED = "在 Debian 上安装软件包很简单：运行 sudo apt install nginx，然后 the service starts automatically after installation."


def test_languages_of_whole_and_mixed_documents():
    assert identify(EN)[0] == "en" and identify(EN)[1] > 0.9
    assert identify(ZH)[0] == "zh" and identify(DE)[0] == "de"
    lang, _, shares = identify(MIXED)
    assert set(shares) == {"zh", "en"} and lang == max(shares, key=shares.get)
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert identify("12345 !!! ---")[0] == "und"


def _batch(texts, reasons=None):
    n = len(texts)
    return {"text": list(texts), "reject_reason": reasons or [None] * n, "reject_detail": [None] * n}


def test_data_languages_keeps_mixed_documents_for_either_language_and_marks_the_rest():
    out = language_batch(_batch([EN, ZH, DE, MIXED, "already out"], [None] * 4 + ["too_short"]),
                         load_config(None, {"data.languages": ["en"]}).data)
    assert out["lang"][:3] == ["en", "zh", "de"] and out["lang"][4] is None
    assert out["reject_reason"] == [None, "language", "language", None, "too_short"]
    assert "zh" in out["reject_detail"][1] and "['en']" in out["reject_detail"][1]
    keep_all = language_batch(_batch([DE]), load_config(None, {}).data)
    assert keep_all["reject_reason"] == [None] and keep_all["lang"] == ["de"]


def test_decontamination_matches_13_grams_and_long_short_items_case_blind(tmp_path):
    question = ("Which command removes a package together with its configuration files on a Debian system "
                "when you no longer need it")
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"question": question, "choices": ["apt purge", "apt remove"], "answer": 0},
        {"question": "安装软件包的命令是什么呢", "answer": "B"},        # 12 CJK tokens: matched whole; "B" left out
        {"question": "yes", "answer": "no"},                          # too short to match anything safely
    ]) + "\n", encoding="utf-8")
    ngrams = EvalNgrams([str(evals)], 13)
    assert ngrams.skipped == 5  # the two choices, "B", "yes", "no"
    docs = [f"Forum post. {question.upper()}? Use apt purge.",               # contains the question
            "Which command removes a package on Debian? Use apt remove.",      # shares only short n-grams
            "请问：安装软件包的命令是什么呢？答：apt install。",                  # contains the Chinese item
            "yes, no, yes and no: a document about answers."]
    out = decontaminate_batch(_batch(docs), ngrams)
    assert out["reject_reason"] == ["contaminated", None, "contaminated", None]
    assert "eval.jsonl" in out["reject_detail"][0]


def test_eval_files_read_as_jsonl_or_lines_and_bad_ones_are_named(tmp_path):
    (tmp_path / "items.txt").write_text("first item\n\nsecond item\n", encoding="utf-8")
    assert eval_items(str(tmp_path / "items.txt")) == ["first item", "second item"]
    (tmp_path / "bad.jsonl").write_text('{"q": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl line 2 is not JSON"):
        eval_items(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="does not exist"):
        eval_items(str(tmp_path / "missing.jsonl"))


def test_vectorised_classifier_matches_py3langid_on_real_text():
    """The NumPy feature extraction finds exactly langid.py's features, so it picks the same language with the
    same probability, on every kind of text in the filter set (Chinese, English, code documentation, junk)."""
    import gzip
    from pathlib import Path

    import numpy as np
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from llmforge.data.language import MAX_CHARS, _identifier

    load = getattr(LanguageIdentifier, "from_pickled_model", None) or LanguageIdentifier.from_model_file
    reference = load(MODEL_FILE, norm_probs=True)
    ours = _identifier()
    path = Path(__file__).resolve().parents[1] / "data" / "filter_set.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:MAX_CHARS] for line in f][::4]
    texts += ["", "a", "ab", "中", MIXED]
    for text in texts:
        ids, counts = ours.features_of(text.encode("utf-8", errors="surrogatepass"))
        expected = np.asarray(reference.instance2fv(text))
        assert (np.flatnonzero(expected) == ids).all() and (expected[ids] == counts).all(), text[:80]
        lang, prob = ours.classify(text)
        ref_lang, ref_prob = reference.classify(text)
        assert lang == ref_lang and abs(prob - ref_prob) < 1e-4, text[:80]
