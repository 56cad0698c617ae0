import random


from llmforge.config import DedupConfig
import pyarrow as pa

from llmforge.data.dedup import lsh_params, minhash, signature_batch, signatures, similarity
from llmforge.data.pipeline import bucket_rows, duplicates_in_partition, resolve_duplicates, signature_rows

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
    """The pipeline's duplicate search (bucket rows, one partition, resolution) on ``texts``."""
    table = pa.Table.from_pydict(signature_batch(batch(texts), cfg))
    dups = resolve_duplicates([duplicates_in_partition(bucket_rows(table, cfg, 1), signature_rows(table), cfg)])
    return {o: (kind, of) for o, of, kind in zip(*(dups.column(c).to_pylist() for c in ("order", "duplicate_of", "kind")))}


def test_minhash_estimates_jaccard():
    a = article(300, 1)
    b = a.replace("kernel", "KERNEL-X", 3)
    est = similarity(minhash(a, CFG).tobytes(), minhash(b, CFG).tobytes())
    assert abs(est - jaccard(a.lower(), b.lower())) < 0.12
    other = article(300, 2)  # same 20-word vocabulary: true Jaccard 0.23
    est = similarity(minhash(a, CFG).tobytes(), minhash(other, CFG).tobytes())
    assert abs(est - jaccard(a.lower(), other.lower())) < 0.12 and est < CFG.threshold / 2


def test_batched_signatures_equal_one_text_at_a_time():
    texts = [article(200, 3), "short", "", "ab", "中文的文本，和 English 混在一起。", article(50, 4)]
    one_by_one = [minhash(t, CFG) for t in texts]
    assert (signatures(texts, CFG) == one_by_one).all()
    # a window across two texts would make the batch differ from each text alone
    assert (signatures(texts[::-1], CFG) == one_by_one[::-1]).all()


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


def test_near_duplicate_recall_on_real_text_with_light_edits_and_appended_lines():
    """A labelled set of our own from real text: 240 documents of the sample corpus (the Debian Reference,
    English and Chinese, those the quality filter keeps), each planted once more with about 1% of its
    characters edited, with a short repost line appended, or both; and 150 other documents all ending in
    the same footer. At least 95% of each kind of group is collapsed onto its original (the first in the
    input), and no document is merged with another group."""
    import gzip
    import json

    from llmforge.config import load_config
    from llmforge.data.clean import normalize_text, quality_issue
    from llmforge.samples import sample_file
    data = load_config(None, {}).data
    docs = []
    for line in gzip.open(sample_file("corpus.jsonl.gz"), "rt", encoding="utf-8"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        rid = str(record.get("id", "")) if isinstance(record, dict) else ""
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "copy" in rid or "near" in rid:
            continue
        text = normalize_text(record["text"])
        if quality_issue(text, data) is None and text not in docs:
            docs.append(text)
    r = random.Random(7)

    def edit(text: str) -> str:  # about 1% of the characters substituted, deleted or inserted
        chars = list(text)
        for _ in range(max(1, len(chars) // 100)):
            i, op = r.randrange(len(chars)), r.random()
            if op < 0.4:
                chars[i] = r.choice("abcdefghijklmnopqrstuvwxyz的是了")
            elif op < 0.7:
                del chars[i]
            else:
                chars.insert(i, r.choice("etaoin 的"))
        return "".join(chars)
    reposts = ["Reposted from the debian-user mailing list.", "转载自论坛，原文见链接。", "Edit: fixed a typo.",
               "Thanks for reading, comments welcome!"]
    footer = ("\n\nThis page is part of the Debian Reference. Copyright the Debian Reference authors; licensed "
              "under the GPL version 2 or later. Report bugs against the debian-reference package.")
    kinds = ("edit", "append", "both")
    texts, kind_of = [], {}
    for g, text in enumerate(docs[:240]):
        kind = kinds[g % 3]
        variant = {"edit": edit(text), "append": text + "\n" + r.choice(reposts),
                   "both": edit(text) + "\n" + r.choice(reposts)}[kind]
        texts += [text, variant]
        kind_of[len(texts) - 1] = kind
    groups = len(texts)
    texts += [text + footer for text in docs[240:390]]
    result = found(texts)
    recall = {k: sum(1 for i, kk in kind_of.items() if kk == k and result.get(i) == ("near_duplicate", i - 1))
              / sum(1 for kk in kind_of.values() if kk == k) for k in kinds}
    print(json.dumps({"figure": "near_duplicate_recall", **{k: round(v, 3) for k, v in recall.items()}}))
    assert all(v >= 0.95 for v in recall.values()), recall
    assert all(of == i - 1 for i, (_, of) in result.items() if i < groups)   # onto its own original, kept first
    assert not [i for i in result if i >= groups or i not in kind_of]        # nothing else merged


def test_map_reduce_over_files_and_partitions_finds_what_one_partition_finds(tmp_path):
    """The pipeline's duplicate search splits the records by file (map) and the bucket keys by hash partition
    (reduce): any split gives the drop list of one partition over everything."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from llmforge.data.pipeline import _bucket_files, _duplicates_of

    base = [article(200, s) for s in range(30)]
    texts = base + [t[:300] + " a reposted line " + t[300:] for t in base[:10]] + base[10:15]
    rng = random.Random(7)
    rng.shuffle(texts)
    table = pa.Table.from_pydict(signature_batch(batch(texts), CFG))
    files = []
    for i, start in enumerate(range(0, table.num_rows, 12)):  # four files
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table.slice(start, 12), files[-1])
    one = found(texts)
    fs = pafs.LocalFileSystem()
    for partitions, chunks in ((1, [files]), (3, [files[:1], files[1:]]), (5, [[f] for f in files])):
        mapped = [_bucket_files(chunk, fs, CFG, partitions) for chunk in chunks]
        dups = resolve_duplicates([_duplicates_of(CFG, *(m[p] for m in mapped)) for p in range(partitions)])
        got = {o: (k, of) for o, of, k in zip(*(dups.column(c).to_pylist() for c in ("order", "duplicate_of", "kind")))}
        assert got == one and len(one) == 15, (partitions, len(got), len(one))


def test_partitions_are_the_fewest_whose_reduce_fits_the_budget(tmp_path):
    """``dedup_partitions`` against what the map side really hands each reduce task (bucket rows and signatures,
    in Arrow bytes): the count it picks fits the budget, half of it would not, and it never goes below one per
    CPU. Nine partitions for a small corpus (the rows-per-partition rule it replaces) shipped each signature
    about eight times without making a reduce any smaller."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from llmforge.data.pipeline import _bucket_files, dedup_partitions

    texts = [article(120, s) for s in range(600)]
    table = pa.Table.from_pydict(signature_batch(batch(texts), CFG))
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(table, path)
    fs = pafs.LocalFileSystem()

    def largest_reduce(partitions: int) -> int:
        return max(rows.nbytes + sigs.nbytes for rows, sigs in _bucket_files([path], fs, CFG, partitions))

    everything = largest_reduce(1)
    for budget in (everything * 2, everything // 2, everything // 3):  # 1, 8 and 32 partitions
        p = dedup_partitions(len(texts), CFG, cpus=1, budget=budget)
        assert largest_reduce(p) <= budget * 1.1, (budget, p)  # 600 documents' hash partitions are not equal
        if p > 1:
            assert largest_reduce(p // 2) > budget, (budget, p)
    assert dedup_partitions(len(texts), CFG, cpus=1, budget=everything * 2) == 1
    assert dedup_partitions(len(texts), CFG, cpus=4, budget=everything * 2) == 4  # one reduce per CPU at least
    assert dedup_partitions(98_088, CFG, cpus=2) == 2  # the 240 MB multi-node bench: 85 MB a reduce
    assert dedup_partitions(10**9, CFG, cpus=2) == 1024  # capped; a reduce then holds more than the budget
