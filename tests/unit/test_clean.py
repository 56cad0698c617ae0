from llmforge.config import DataConfig
from llmforge.data.clean import normalize_text, quality_issue, tokens

CFG = DataConfig()
EN = ("Debian is a free operating system developed by volunteers. The package manager installs software "
      "from signed archives, resolves dependencies and keeps the system up to date. Administrators can pin "
      "versions, hold packages and roll back upgrades when something breaks.")
ZH = ("Debian 是一个由志愿者开发的自由操作系统。软件包管理器从签名的仓库安装软件，自动解决依赖关系，并保持系统更新。"
      "管理员可以固定版本、保留软件包，在升级出现问题时进行回滚。")


def test_normalize_nfkc_controls_ansi_whitespace():
    raw = "\ufeffＡＢＣ１２３\x1b[31mred\x1b[0m\x00 and\t\ttabs  \r\n\n\n\nnext\u200b line  "
    assert normalize_text(raw) == "ABC123red and tabs\n\nnext line"


def test_normalize_keeps_chinese_and_fullwidth_punctuation_folds():
    assert normalize_text("你好，世界！") == "你好,世界!"


def test_tokens_are_characters_for_cjk_and_words_for_latin():
    assert tokens("Hello world, 你好世界 v2") == ["Hello", "world", "你", "好", "世", "界", "v2"]


def test_clean_english_and_chinese_pass():
    assert quality_issue(EN, CFG) is None
    assert quality_issue(ZH, CFG) is None


def test_length_bounds():
    assert quality_issue("too short", CFG)[0] == "too_short"
    assert quality_issue("", CFG)[0] == "empty"
    assert quality_issue(EN * 3, DataConfig(max_chars=200))[0] == "too_long"
    # 40 Chinese characters are 40 characters: no whitespace-based counting.
    assert quality_issue(ZH[:40], CFG)[0] == "too_short"


def test_symbols():
    assert quality_issue("$$$ %%% ### @@@ !!! *** ^^^ &&& " * 10, CFG)[0] == "symbol_ratio"


def test_repeated_lines_and_ngrams_and_diversity():
    assert quality_issue("\n".join(["Click here to subscribe"] * 20), CFG)[0] == "repeated_lines"
    assert quality_issue("BUY NOW!!! " * 40, CFG)[0] in {"repeated_ngrams", "low_diversity"}
    assert quality_issue("哈" * 200, CFG)[0] == "low_diversity"
    assert quality_issue("免费领取优惠券！" * 30, CFG)[0] in {"repeated_ngrams", "low_diversity"}
    # A long text that repeats one phrase many times in one line.
    spam = EN + " " + "best cheap pills online " * 30
    assert quality_issue(spam, CFG)[0] == "repeated_ngrams"


def test_thresholds_from_config():
    assert quality_issue(EN, DataConfig(min_chars=10_000))[0] == "too_short"
    assert quality_issue("\n".join(["Click here to subscribe"] * 20), DataConfig(max_duplicate_line_fraction=1.0,
                         max_top_2gram_fraction=1.0, max_top_3gram_fraction=1.0, max_duplicate_ngram_fraction=1.0,
                         min_unique_token_ratio=0.0)) is None


def _reference_fractions(toks: list[str], n: int, dup_n: int) -> tuple[float, float]:
    """The two repeated n-gram measures, one document at a time in plain Python."""
    from collections import Counter
    total = sum(map(len, toks))
    top_fraction = 0.0
    if len(toks) >= n + 1:
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        counts = Counter(grams)
        top = max(counts.values())
        if top >= 2:
            first = next(i for i, g in enumerate(grams) if counts[g] == top)
            top_fraction = top * sum(map(len, toks[first:first + n])) / total
    dup_fraction = 0.0
    if len(toks) >= 2 * dup_n:
        grams = [tuple(toks[i:i + dup_n]) for i in range(len(toks) - dup_n + 1)]
        counts = Counter(grams)
        covered = [False] * len(toks)
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i:i + dup_n] = [True] * dup_n
        dup_fraction = sum(len(t) for t, c in zip(toks, covered) if c) / total
    return top_fraction, dup_fraction


def test_batched_ngram_measures_equal_one_document_at_a_time():
    """The repeated n-gram checks run on a whole batch's tokens at once; no n-gram may reach across two
    documents, and ties go to the first, as a plain per-document count says."""
    import random

    from llmforge.data.clean import _Ngrams
    rng = random.Random(5)
    vocab = ["the", "a", "package", "系", "统", "x", "debian", "1", "install", "安装"]
    docs = [[], ["one"], ["a", "b"], ["a", "a", "a"]]
    for _ in range(300):
        words = vocab[:rng.randint(2, len(vocab))]
        docs.append([rng.choice(words) for _ in range(rng.randint(0, 60))])
    docs.append(["same", "words"] * 30)
    grams = _Ngrams(docs)
    for n, dup_n in ((2, 10), (3, 10), (3, 5)):
        tops, dups = grams.top_fraction(n), grams.duplicate_fraction(dup_n)
        for i, toks in enumerate(docs):
            assert (tops[i], dups[i]) == _reference_fractions(toks, n, dup_n), (n, dup_n, toks)
