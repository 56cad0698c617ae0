import gzip
import json
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmforge.config import load_config
from llmforge.data.pipeline import prepare
from llmforge.errors import InputError, LeaseHeld, OutputExistsError
from llmforge.lease import Lease

from conftest import REPO, SAMPLE

pytestmark = pytest.mark.integration


def read_dir(path) -> pa.Table:
    return pq.read_table(str(path))


def sample_records() -> list[dict]:
    out = []
    for line in gzip.open(SAMPLE, "rt", encoding="utf-8"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


def test_sample_corpus_end_to_end(sample_dataset):
    out, manifest = sample_dataset
    stats = json.loads((out / "stats.json").read_text())
    clean = read_dir(out / "clean").to_pylist()
    rejects = read_dir(out / "rejects").to_pylist()
    records = sample_records()

    # Every input record is either kept or rejected with a reason: nothing is lost.
    assert len(clean) + len(rejects) == len(records) == stats["input"]["records"]
    assert stats["kept_docs"] == len(clean) and stats["rejected_docs"] == len(rejects)
    reasons = {r["reason"] for r in rejects}
    assert {"malformed_json", "missing_text", "exact_duplicate", "near_duplicate"} <= reasons
    assert stats["read"]["malformed_json"] == 2 and stats["read"]["missing_text"] == 2
    assert all(r["text"] for r in rejects if r["reason"] != "missing_text")

    # Kept documents keep their original ids; planted copies never survive beside their original.
    ids = {r["id"] for r in clean}
    input_ids = {r["id"] for r in records if isinstance(r, dict) and "id" in r}
    assert ids <= input_ids
    for rid in ids:
        base = rid.split("-copy")[0]
        assert not (rid != base and base in ids), rid
    assert stats["dedup"]["exact_duplicates"] >= 10 and stats["dedup"]["near_duplicates"] >= 10

    # No planted PII is left in the clean text; the placeholders are.
    text = "\n".join(r["text"] for r in clean)
    assert not re.search(r"user\d{3}@example\.(org|net|com)", text)
    assert not re.search(r"(?<!\d)138\d{8}(?!\d)", text)
    assert "<EMAIL>" in text and "<PHONE>" in text
    assert stats["pii"]["by_type"]["EMAIL"] >= 10 and sum(stats["pii"]["by_type"].values()) >= 50

    # Tokenizer loads with transformers and round-trips Chinese and English.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    sample = "Debian 软件包管理器 apt-get install"
    assert tok.decode(tok(sample)["input_ids"]) == sample
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")

    # Packed shards: fixed length, EOS between documents, counts in the manifest.
    train = read_dir(out / "tokens" / "train")
    val = read_dir(out / "tokens" / "val")
    assert manifest["splits"]["train"]["sequences"] == train.num_rows > 100
    assert manifest["splits"]["val"]["sequences"] == val.num_rows > 0
    seqs = train.column("input_ids").to_pylist()
    assert {len(s) for s in seqs} == {128}
    assert sum(s.count(manifest["eos_token_id"]) for s in seqs) > 10
    assert max(max(s) for s in seqs) < manifest["vocab_size"]
    assert (out / "config.yaml").read_text().count("seq_len: 128") == 1

    # Every kept document's language is in clean/ and counted: the sample is English and Chinese.
    assert all(r["lang"] and 0 <= r["lang_score"] <= 1 for r in clean)
    kept = stats["languages"]["kept"]
    assert sum(kept.values()) == len(clean) and kept["en"] > 100 and kept["zh"] > 100
    assert kept["en"] + kept["zh"] >= 0.97 * len(clean), kept


def test_output_is_refused_unless_overwrite(sample_dataset):
    out, _ = sample_dataset
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare([str(SAMPLE)], str(out), load_config())


def test_malformed_input_formats_and_rejects(ray_cluster, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = ("Ray Data streams blocks between operators so a corpus larger than memory can be processed, "
            "while each worker keeps only a few batches in flight and spills the rest to disk.")
    (src / "a.jsonl").write_bytes(
        json.dumps({"id": "g1", "text": good, "lang": "en"}).encode() + b"\n"
        + b'{"id": "bad-utf8", "text": "caf\xc3\xa9 \xff menu: espresso, croissant and a long list of '
        b'pastries baked every morning in the small kitchen behind the counter"}\n'
        + b'{"id": "trunc", "text": "no end\n'
        + b"\n"
        + json.dumps({"id": "nt", "content": "wrong key"}).encode() + b"\n")
    (src / "b.txt").write_text("A plain text document that is long enough to pass the length filter, "
                               "about Debian package management and mirrors.", encoding="utf-8")
    pq.write_table(pa.table({"text": ["Parquet input row with enough characters to pass the quality filter easily.", None],
                             "id": ["p1", "p2"], "year": [2024, 2025]}), src / "c.parquet")
    out = tmp_path / "out"
    prepare([str(src)], str(out), load_config(None, {"data.seq_len": 16, "data.tokenizer.vocab_size": 300,
                                                      "data.tokenizer.min_frequency": 1, "data.val_fraction": 0.0}))
    clean = {r["id"]: r for r in read_dir(out / "clean").to_pylist()}
    rejects = {r["id"]: r for r in read_dir(out / "rejects").to_pylist()}
    assert set(clean) == {"g1", "bad-utf8", "b.txt", "p1"}
    assert json.loads(clean["g1"]["meta"]) == {"lang": "en"} and json.loads(clean["p1"]["meta"]) == {"year": 2024}
    assert "\ufffd" in clean["bad-utf8"]["text"]
    assert rejects["a.jsonl:3"]["reason"] == "malformed_json"
    assert rejects["nt"]["reason"] == "missing_text" and "wrong key" in rejects["nt"]["text"]
    assert rejects["p2"]["reason"] == "missing_text"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"]["utf8_repaired_records"] == 1
    assert not list(tmp_path.glob("out.partial-*"))


def test_missing_and_empty_inputs_fail_before_work(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), load_config())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        prepare([str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), load_config())
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="no corpus files"):
        prepare([str(tmp_path / "csv")], str(tmp_path / "o"), load_config())


def test_cli_reports_bad_input_in_one_paragraph(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), "--input", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "o"), "--data.min_charz=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "data.min_charz: unknown field" in proc.stderr


def test_s3_input_and_output(s3, ray_cluster, tmp_path):
    s3.create_bucket(Bucket="corpus")
    s3.put_object(Bucket="corpus", Key="raw/part-0.jsonl.gz", Body=SAMPLE.read_bytes())
    manifest = prepare(["s3://corpus/raw/*.jsonl.gz"], "s3://corpus/datasets/sample",
                       load_config(None, {"data.seq_len": 128, "data.tokenizer.vocab_size": 1000}))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="datasets/")["Contents"]}
    assert "datasets/sample/manifest.json" in keys and "datasets/sample/tokenizer/tokenizer.json" in keys
    assert any(k.startswith("datasets/sample/tokens/train/") for k in keys)
    assert not any(".partial-" in k or "/_work/" in k for k in keys)
    assert "datasets/sample.lease" not in {o["Key"] for o in s3.list_objects_v2(Bucket="corpus")["Contents"]}
    stored = json.loads(s3.get_object(Bucket="corpus", Key="datasets/sample/manifest.json")["Body"].read())
    assert stored["splits"] == manifest["splits"] and manifest["splits"]["train"]["sequences"] > 100


def test_a_second_concurrent_prepare_into_the_same_output_refuses(ray_cluster, tmp_path, monkeypatch):
    """Before, the second run passed the start-up check and deleted the first one's output at its end."""
    import threading
    corpus = tmp_path / "corpus.jsonl"
    import random
    rng = random.Random(0)
    words = "debian package apt install kernel module network file system user group service log disk".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                              for _ in range(300)))
    out = tmp_path / "ds"
    cfg = load_config(None, {"data.seq_len": 32, "data.tokenizer.vocab_size": 300, "data.dedup.near": False})
    first: dict = {}
    # The first run holds its lease until the second one has tried: faster pipelines made this a race.
    from llmforge.data import pipeline
    started, release, run = threading.Event(), threading.Event(), pipeline._run

    def held_run(*args, **kwargs):
        started.set()
        release.wait(120)
        return run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", held_run)
    runner = threading.Thread(target=lambda: first.update(manifest=prepare([str(corpus)], str(out), cfg)))
    runner.start()
    assert started.wait(60), "the first prepare never got past its lease"
    assert (tmp_path / "ds.lease").exists()
    try:
        with pytest.raises(LeaseHeld, match=f"prepare into {out}"):
            prepare([str(corpus)], str(out), cfg, overwrite=True)
    finally:
        release.set()
    runner.join(300)
    assert first["manifest"]["splits"]["train"]["sequences"] > 0
    assert (out / "manifest.json").is_file() and not (tmp_path / "ds.lease").exists()


def test_leases_work_on_s3(s3):
    s3.create_bucket(Bucket="leases")
    uri = "s3://leases/runs/r1.lease"
    with Lease(uri, "training run r1", ttl_s=30, settle_s=0.1):
        with pytest.raises(LeaseHeld, match="training run r1"):
            Lease(uri, "training run r1 again", ttl_s=30, settle_s=0.1).acquire()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="leases").get("Contents", [])]
    assert "runs/r1.lease" not in keys, keys  # released (pyarrow may leave its empty "runs/" marker)


def test_languages_and_decontamination(ray_cluster, tmp_path):
    """data.languages keeps English and Chinese (mixed documents included) and rejects the rest with their
    language; data.decontaminate rejects the documents holding a 13-gram of an evaluation item."""
    question = ("which command removes a package together with its configuration files on a debian system "
                "when it is no longer needed")
    docs = {
        "en": "APT keeps a local cache of downloaded packages in /var/cache/apt/archives, and apt clean empties it "
              "when the disk runs short of space on a small server.",
        "zh": "软件包管理系统会记录每个已安装的软件包及其依赖关系，升级系统时可以自动处理这些依赖，非常方便可靠。"
              "管理员也可以锁定某些软件包的版本。",
        "mixed": "在 Debian 上安装软件包很简单：运行 sudo apt install nginx，然后 the service starts automatically "
                 "after the installation has finished.",
        "de": "Die Paketverwaltung speichert heruntergeladene Pakete in einem lokalen Zwischenspeicher, der bei "
              "Platzmangel geleert werden kann.",
        "leak": f"Homework help: {question.title()}? The answer is apt purge, which removes everything.",
    }
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in docs.items()),
                      encoding="utf-8")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"question": question, "choices": ["apt purge", "apt remove"]}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    prepare([str(corpus)], str(out), load_config(None, {
        "data.seq_len": 16, "data.tokenizer.vocab_size": 300, "data.tokenizer.min_frequency": 1,
        "data.val_fraction": 0.0, "data.dedup.near": False, "data.languages": ["en", "zh"],
        "data.decontaminate": [str(evals)]}))
    clean = {r["id"]: r for r in read_dir(out / "clean").to_pylist()}
    rejects = {r["id"]: r for r in read_dir(out / "rejects").to_pylist()}
    assert set(clean) == {"en", "zh", "mixed"} and set(rejects) == {"de", "leak"}
    assert (clean["en"]["lang"], clean["zh"]["lang"]) == ("en", "zh") and clean["mixed"]["lang"] in ("en", "zh")
    assert rejects["de"]["reason"] == "language" and rejects["de"]["detail"].startswith("de ")
    assert rejects["leak"]["reason"] == "contaminated" and "eval.jsonl" in rejects["leak"]["detail"]
    stats = json.loads((out / "stats.json").read_text())
    from collections import Counter
    want = Counter(r["lang"] for r in clean.values())
    assert stats["languages"] == {"kept": dict(want), "rejected": 1, "wanted": ["en", "zh"]}
    assert stats["decontamination"]["contaminated"] == 1 and "language" not in stats["filter"]


def _tokens_of(path) -> tuple[int, "Counter"]:
    from collections import Counter
    seqs = read_dir(path).column("input_ids").to_pylist()
    return len(seqs), Counter(t for s in seqs for t in s)


def test_a_given_tokenizer_packs_in_the_pass_that_writes_clean_and_loses_no_tail(sample_dataset, tmp_path):
    """With data.tokenizer.path the kept rows are tokenized and packed in step 3 (blocks of the pass-1 files)
    instead of a pass of their own over clean/: the same documents, the same number of sequences per split, the
    same tokens but for the one partial sequence at the very end; and that number is the whole token stream's,
    so no block's tail was dropped."""
    from transformers import AutoTokenizer
    base, manifest = sample_dataset
    out = tmp_path / "given"
    got = prepare([str(SAMPLE)], str(out), load_config(None, {
        "data.seq_len": 128, "data.tokenizer.path": str(base / "tokenizer"), "data.batch_size": 64}))
    ids = lambda p: sorted(r["id"] for r in read_dir(p / "clean").select(["id"]).to_pylist())  # noqa: E731
    assert ids(out) == ids(base)
    for split in ("train", "val"):
        n_base, tokens_base = _tokens_of(base / "tokens" / split)
        n_given, tokens_given = _tokens_of(out / "tokens" / split)
        assert got["splits"][split]["sequences"] == n_given == n_base == manifest["splits"][split]["sequences"]
        assert sum(((tokens_base - tokens_given) + (tokens_given - tokens_base)).values()) < 2 * 128
    from llmforge.data.pack import split_of
    tok = AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    clean = read_dir(base / "clean").select(["order", "text"]).to_pylist()
    cfg = load_config(None, {})
    lengths = {"train": 0, "val": 0}
    for r in clean:
        lengths[split_of(r["order"], cfg.data.val_fraction, cfg.data.split_seed)] += len(
            tok(r["text"], add_special_tokens=False)["input_ids"]) + 1
    assert {s: n // 128 for s, n in lengths.items()} == {s: v["sequences"] for s, v in got["splits"].items()}


def test_duplicate_search_on_ray_gives_one_drop_list_for_any_partition_count(ray_cluster, tmp_path):
    """find_duplicates as Ray tasks with 1 partition (a cluster of one CPU: one return value per map task, not a
    list) and with several finds the same duplicates."""
    import pyarrow.fs as pafs

    from llmforge.config import DedupConfig
    from llmforge.data.dedup import signature_batch
    from llmforge.data.executor import RayTasks
    from llmforge.data.pipeline import find_duplicates
    import random
    rng = random.Random(3)
    words = [f"w{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(40)]
    texts += texts[:5] + [t + " and one more line" for t in texts[5:10]]
    n = len(texts)
    batch = {"text": texts, "reject_reason": [None] * n, "order": list(range(n))}
    table = pa.Table.from_pydict(signature_batch(batch, DedupConfig()))
    files = []
    for i in range(0, n, 15):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table.slice(i, 15), files[-1])
    fs = pafs.LocalFileSystem()
    results = [find_duplicates(RayTasks(), files, fs, DedupConfig(), partitions, map_tasks=2).sort_by("order").to_pylist()
               for partitions in (1, 3)]
    assert results[0] == results[1]
    assert [(r["order"], r["duplicate_of"], r["kind"]) for r in results[0]] == (
        [(40 + i, i, "exact_duplicate") for i in range(5)] + [(45 + i, 5 + i, "near_duplicate") for i in range(5)])


def test_file_tasks_log_progress_and_keep_file_order(ray_cluster, tmp_path, caplog):
    """Steps 3 and 5 run as one Ray task per file: their rows come back in file order whatever order the tasks
    finish in, and a progress line is logged while tasks are left."""
    import logging

    from llmforge.data.executor import RayTasks

    def _slow_rows(paths, delay):  # nested: Ray pickles it by value (the test module is not on workers' path)
        import time as _time
        _time.sleep(delay * (3 - int(paths[0][-1])) / 3 + 0.3)  # the first file finishes last
        return [{"file": p} for p in paths]

    files = [str(tmp_path / f"f{i}") for i in range(4)]
    with caplog.at_level(logging.INFO, logger="llmforge.data.pipeline"):
        rows = RayTasks().map(_slow_rows, files, 0.6, what="step 9", progress_s=0.2)
    assert [r["file"] for r in rows] == files
    assert any("step 9:" in m and "/4 tasks done" in m for m in caplog.messages)


def test_a_large_jsonl_file_read_in_byte_ranges_gives_the_same_dataset(sample_dataset, tmp_path):
    """Pass 1 reads an uncompressed JSONL file larger than data.read_range_mb in byte ranges, a Ray task each
    (lines numbered by a counting pass): the same records, ids, orders, rejects and counts as one task reading
    it whole, and the same number of sequences."""
    base, _ = sample_dataset
    corpus = tmp_path / "corpus.jsonl"
    raw = gzip.decompress(SAMPLE.read_bytes())
    corpus.write_bytes(raw.replace(b"\n", b"\n\n", 7))  # blank lines: orders follow line numbers, not records
    runs = {}
    for mb in (1, 64):
        out = tmp_path / f"ranges-{mb}"
        runs[mb] = prepare([str(corpus)], str(out), load_config(None, {
            "data.seq_len": 128, "data.tokenizer.path": str(base / "tokenizer"), "data.read_range_mb": mb}))
        assert len(list((out / "clean").glob("*.parquet"))) >= (2 if mb == 1 else 1)
    tables = {mb: {d: read_dir(tmp_path / f"ranges-{mb}" / d).sort_by("order").to_pylist() for d in ("clean", "rejects")}
              for mb in runs}
    assert tables[1] == tables[64]
    assert len(tables[1]["clean"]) + len(tables[1]["rejects"]) == len(raw.splitlines())
    assert max(r["order"] for r in tables[1]["rejects"] + tables[1]["clean"]) == len(raw.splitlines()) + 6
    stats = {mb: json.loads((tmp_path / f"ranges-{mb}" / "stats.json").read_text()) for mb in runs}
    for s in stats.values():
        s.pop("seconds"), s.pop("docs_per_s")
    assert stats[1] == stats[64]
    assert runs[1]["splits"] == runs[64]["splits"]


def test_local_processes_give_the_dataset_ray_gives(sample_dataset, tmp_path):
    """data.executor=local (a pool of processes, no Ray; what `auto` takes for a small input when no cluster is
    given) runs the same tasks as Ray: the same clean/, rejects/, tokenizer, token shards and counts as the
    session's dataset, prepared on Ray, including step 5 (the tokenizer trained after clean/ is written)."""
    base, manifest = sample_dataset
    out = tmp_path / "local"
    got = prepare([str(SAMPLE)], str(out), load_config(None, {"data.seq_len": 128, "data.tokenizer.vocab_size": 2000,
                                                              "data.executor": "local"}))
    stats = {p: json.loads((p / "stats.json").read_text()) for p in (base, out)}
    assert stats[base]["executor"]["kind"] == "ray" and stats[out]["executor"]["kind"] == "local"
    for s in stats.values():
        for key in ("seconds", "docs_per_s", "executor"):
            s.pop(key)
    assert stats[out] == stats[base]
    assert got["splits"] == manifest["splits"] and got["vocab_size"] == manifest["vocab_size"]
    for d in ("clean", "rejects"):
        assert read_dir(out / d).sort_by("order").equals(read_dir(base / d).sort_by("order")), d
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer" / "tokenizer.json").read_bytes()
    shards = lambda p: sorted(f.relative_to(p) for f in (p / "tokens").rglob("*.parquet"))  # noqa: E731
    assert shards(out) == shards(base) and shards(out)
    for shard in shards(out):
        assert read_dir(out / shard).equals(read_dir(base / shard)), shard
