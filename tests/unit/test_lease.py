"""Leases (one live job per output or run) and outputs that are put in place whole."""

import json
import threading
import time

import pytest

from llmforge import storage
from llmforge.errors import InputError, LeaseHeld
from llmforge.lease import Lease


def test_a_live_lease_refuses_a_second_holder_and_names_the_first(tmp_path):
    uri = str(tmp_path / "out.lease")
    with Lease(uri, "prepare into out", ttl_s=3, settle_s=0):
        with pytest.raises(LeaseHeld, match="prepare into out") as refused:  # on seeing it renewed
            Lease(uri, "prepare into out (second)", ttl_s=3, settle_s=0).acquire()
        assert "pid" in str(refused.value) and refused.value.exit_code == 2
    assert not storage.exists(uri)  # released
    with Lease(uri, "third", ttl_s=30, settle_s=0):
        pass


def test_a_lease_is_renewed_while_its_holder_lives_and_taken_over_after_it_dies(tmp_path, caplog):
    uri = str(tmp_path / "run.lease")
    first = Lease(uri, "training run r", ttl_s=0.6, settle_s=0).acquire()
    time.sleep(1.5)  # two and a half times its time to live: only renewal keeps it
    with pytest.raises(LeaseHeld):
        Lease(uri, "second", ttl_s=0.6, settle_s=0).acquire()
    first._stop.set()  # the holder dies: no more renewals, no release
    first._renewer.join()
    time.sleep(0.8)
    with caplog.at_level("WARNING", logger="llmforge"):
        second = Lease(uri, "second", ttl_s=30, settle_s=0).acquire()
    assert "whose holder has stopped" in caplog.text
    assert json.loads(storage.read_text(uri))["owner"] == second.owner
    first.release()  # the old holder's release must not delete the new holder's lease
    assert storage.exists(uri)
    second.release()


def test_a_lease_whose_holder_process_is_gone_from_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    uri = tmp_path / "run.lease"
    uri.write_text(json.dumps({"owner": "crashed", "host": socket.gethostname(), "pid": dead.pid,
                               "what": "training run r", "expires_at": time.time() + 3600}))
    with Lease(str(uri), "training run r (resubmitted)", ttl_s=3600, settle_s=0) as lease:
        assert json.loads(uri.read_text())["owner"] == lease.owner
    uri.write_text(json.dumps({"owner": "elsewhere", "host": "another-host", "pid": dead.pid,
                               "what": "training run r", "expires_at": time.time() + 0.5}))
    with Lease(str(uri), "training run r", ttl_s=3600, settle_s=0):  # not renewed: taken over once expired
        pass


def test_a_lease_that_cannot_be_written_leaves_no_staged_file(tmp_path, monkeypatch):
    import os

    uri = str(tmp_path / "out.lease")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        Lease(uri, "prepare into out", ttl_s=3, settle_s=0).acquire()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if "lease" in p.name) == []  # nothing beside it either
    with Lease(uri, "the next try", ttl_s=3, settle_s=0):
        assert storage.exists(uri)


def test_a_half_written_lease_counts_as_free(tmp_path):
    uri = tmp_path / "x.lease"
    uri.write_text('{"owner": "dead", "expi')
    with Lease(str(uri), "x", ttl_s=30, settle_s=0) as lease:
        assert json.loads(uri.read_text())["owner"] == lease.owner


def test_two_jobs_starting_together_get_one_lease(tmp_path):
    uri = str(tmp_path / "race.lease")
    for attempt in range(5):  # the race runs afresh each time; without the lock some round lets two in or none
        results: list[str] = []
        holders: list[Lease] = []
        barrier = threading.Barrier(8)

        def start(i: int) -> None:
            barrier.wait()
            try:
                lease = Lease(uri, f"job {i}", ttl_s=3, settle_s=0).acquire()
                results.append("held")
                holders.append(lease)
            except LeaseHeld:
                results.append("refused")
        threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == ["held"] + ["refused"] * 7, f"round {attempt}"
        assert json.loads(storage.read_text(uri))["owner"] == holders[0].owner
        holders[0].release()
        assert not storage.exists(uri)


def test_processes_starting_together_get_one_lease(tmp_path):
    import subprocess
    import sys
    uri = str(tmp_path / "race.lease")
    go, done = tmp_path / "go", tmp_path / "done"
    # Each process says it is ready (imports done) and waits for "go"; the holder keeps its lease until "done",
    # so no process can come late and take over a lease whose holder already exited.
    script = (
        "import os, sys, time\n"
        "from llmforge.errors import LeaseHeld\n"
        "from llmforge.lease import Lease\n"
        "def wait_for(path):\n"
        "    deadline = time.time() + 60\n"
        "    while not os.path.exists(path):\n"
        "        if time.time() > deadline: sys.exit('timed out waiting for ' + path)\n"
        "        time.sleep(0.005)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + sys.argv[1]), 'w').close()\n"
        f"wait_for({str(go)!r})\n"
        "try:\n"
        f"    lease = Lease({uri!r}, 'job', ttl_s=3, settle_s=0).acquire()\n"
        "except LeaseHeld:\n"
        "    print('refused', flush=True)\n"
        "else:\n"
        "    print('held', flush=True)\n"
        f"    wait_for({str(done)!r})\n"
        "    lease.release()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    go.write_text("")
    outs = sorted(p.stdout.readline().strip() for p in procs)  # each prints once it has decided
    done.write_text("")
    for p in procs:
        p.communicate(timeout=60)
    assert outs == ["held", "refused", "refused", "refused"]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]


def test_publishing_replaces_an_output_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with storage.publishing(str(target), last="config.json") as staged:
            (staged / "config.json").write_text("new, half written")
            raise RuntimeError("the export failed")
    assert (target / "config.json").read_text() == "old"
    with storage.publishing(str(target), last="config.json") as staged:
        assert not (staged / "config.json").exists() and staged.parent == tmp_path
        (staged / "config.json").write_text("new")
        (staged / "model.safetensors").write_text("w")
        assert (target / "config.json").read_text() == "old"  # readers see the old one until the swap
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing staged is left behind


def test_serving_refuses_a_model_dir_without_weights(tmp_path):
    from llmforge.serve.app import check_model_dir
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="no weights"):
        check_model_dir(tmp_path, "runs/x/model")
    (tmp_path / "model.safetensors").write_text("w")
    check_model_dir(tmp_path, "runs/x/model")
