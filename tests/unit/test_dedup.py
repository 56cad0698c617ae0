import random


from llmforge.config import DedupConfig
from llmforge.data.dedup import duplicates_in_bucket, explode_buckets, lsh_params, minhash, signature_batch, similarity

CFG = DedupConfig()
rng = random.Random(0)
WORDS = ("kernel package mirror archive install upgrade network service daemon socket buffer cache "
         "policy module driver firmware volume backup snapshot journal").split()


def article(n_words: int, seed: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) + str(r.randint(0, 50)) for _ in range(n_words))


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa = {a[i:i + k] for i in range(len(a) - k + 1)}
    sb = {b[i:i + k] for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def batch(texts: list[str]) -> dict:
    return {"order": list(range(len(texts))), "text": texts, "reject_reason": [None] * len(texts)}


def found(texts: list[str], cfg: DedupConfig = CFG) -> dict[int, tuple[str, int]]:
    rows = explode_buckets(signature_batch(batch(texts), cfg), cfg)
    groups: dict[int, dict] = {}
    for bucket, order, exact, sig in zip(rows["bucket"], rows["order"], rows["exact_hash"], rows["signature"]):
        g = groups.setdefault(bucket, {"order": [], "exact_hash": [], "signature": []})
        g["order"].append(order); g["exact_hash"].append(exact); g["signature"].append(sig)
    out = {}
    for g in groups.values():
        d = duplicates_in_bucket(g, cfg)
        for o, of, kind in zip(d["order"], d["duplicate_of"], d["kind"]):
            if o not in out or kind == "exact_duplicate":
                out[o] = (kind, of)
    return out


def test_minhash_estimates_jaccard():
    a = article(300, 1)
    b = a.replace("kernel", "KERNEL-X", 3)
    est = similarity(minhash(a, CFG).tobytes(), minhash(b, CFG).tobytes())
    assert abs(est - jaccard(a.lower(), b.lower())) < 0.12
    assert similarity(minhash(a, CFG).tobytes(), minhash(article(300, 2), CFG).tobytes()) < 0.2


def test_lsh_params_fit_num_perm():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and b > 1 and r > 1


def test_exact_and_near_duplicates_found_and_first_kept():
    base = article(300, 3)
    near = base[:600] + " inserted words here " + base[600:]
    other = article(300, 4)
    result = found([base, other, base, near])
    assert result == {2: ("exact_duplicate", 0), 3: ("near_duplicate", 0)}


def test_order_decides_which_copy_is_kept():
    base = article(300, 5)
    result = found([article(300, 6), base, base])
    assert result == {2: ("exact_duplicate", 1)}


def test_shared_footer_only_is_not_merged():
    footer = ("\n\nThis document is part of the Debian Reference. Permission is granted to copy and "
              "distribute it under the terms of the GNU General Public License version 2 or later.")
    docs = [article(150, 10 + i) + footer for i in range(5)]
    assert found(docs) == {}


def test_chinese_near_duplicates():
    zh = "软件包管理器从签名的仓库安装软件，自动解决依赖关系，并保持系统更新。管理员可以固定版本、保留软件包，在升级出现问题时进行回滚。" * 3
    assert found([zh, zh.replace("管理员", "系统管理员", 1)]) == {1: ("near_duplicate", 0)}


def test_threshold_from_config():
    base = article(300, 7)
    edited = " ".join(w if i % 6 else "changed" for i, w in enumerate(base.split()))
    j = jaccard(base.lower(), edited.lower())
    assert 0.3 < j < 0.8
    assert found([base, edited]) == {}
    assert found([base, edited], DedupConfig(threshold=j - 0.15)) == {1: ("near_duplicate", 0)}


def test_disabled():
    base = article(100, 8)
    assert found([base, base], DedupConfig(exact=False, near=False)) == {}
