"""Checkpoint manifests: a checkpoint is complete only when every rank's files are there, whole."""

import json
from pathlib import Path

import torch

from llmforge.train.checkpoint import MANIFEST_PREFIX, checkpoint_problem, complete_checkpoints, write_manifest


def _fake_checkpoint(root: Path, name: str, step: int, world: int = 2) -> Path:
    """What Ray Train leaves after merging the ranks' dirs: shared files plus one shard and manifest per rank."""
    ckpt = root / name
    for rank in range(world):
        rank_dir = root / f".rank{rank}-{name}"
        (rank_dir / f"step_{step:08d}").mkdir(parents=True)
        (rank_dir / "latest").write_text(f"step_{step:08d}")
        torch.save({"shard": torch.full((1000 + rank,), rank, dtype=torch.uint8)},
                   rank_dir / f"step_{step:08d}" / f"zero_pp_rank_{rank}_optim_states.pt")
        write_manifest(rank_dir, rank, world, step)
        for f in rank_dir.rglob("*"):
            if f.is_file():
                target = ckpt / f.relative_to(rank_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
    return ckpt


def test_complete_checkpoint_passes(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, "checkpoint_a", 4)
    assert checkpoint_problem(str(ckpt)) is None
    assert checkpoint_problem(str(ckpt), checksums=True) is None
    manifest = json.loads((ckpt / f"{MANIFEST_PREFIX}00001.json").read_text())
    assert manifest["world_size"] == 2 and "step_00000004/zero_pp_rank_1_optim_states.pt" in manifest["files"]


def test_each_kind_of_damage_is_named(tmp_path):
    missing_rank = _fake_checkpoint(tmp_path, "checkpoint_a", 4)
    (missing_rank / f"{MANIFEST_PREFIX}00001.json").unlink()
    assert checkpoint_problem(str(missing_rank)) == "1 of 2 ranks finished saving"

    truncated = _fake_checkpoint(tmp_path, "checkpoint_b", 8)
    shard = truncated / "step_00000008" / "zero_pp_rank_0_optim_states.pt"
    written = shard.stat().st_size
    shard.write_bytes(b"x" * 10)
    assert f"has 10 bytes, {written} were written" in checkpoint_problem(str(truncated))

    flipped = _fake_checkpoint(tmp_path, "checkpoint_c", 12)
    shard = flipped / "step_00000012" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    assert checkpoint_problem(str(flipped)) is None  # sizes match: only the checksum can tell
    assert "SHA-256" in checkpoint_problem(str(flipped), checksums=True)

    lost = _fake_checkpoint(tmp_path, "checkpoint_d", 16)
    (lost / "step_00000016" / "zero_pp_rank_0_optim_states.pt").unlink()
    assert "missing (listed by rank 0)" in checkpoint_problem(str(lost))

    no_manifest = tmp_path / "checkpoint_e"
    no_manifest.mkdir()
    (no_manifest / "latest").write_text("step_00000020")
    assert "no llmforge manifest" in checkpoint_problem(str(no_manifest))


def test_complete_checkpoints_newest_first_skipping_damaged(tmp_path, caplog):
    run = tmp_path / "run"
    _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-01", 4)
    _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-02", 8)
    bad = _fake_checkpoint(run, "checkpoint_2026-01-01_00-00-03", 12)
    (bad / f"{MANIFEST_PREFIX}00000.json").unlink()
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    found = complete_checkpoints(str(run))
    assert [step for step, _ in found] == [8, 4]
    assert found[0][1].endswith("checkpoint_2026-01-01_00-00-02")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint_2026-01-01_00-00-03" in caplog.text
    assert complete_checkpoints(str(tmp_path / "nothing-here")) == []


def test_a_manifest_cut_short_is_a_problem_not_a_crash(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, "checkpoint_a", 4)
    (ckpt / f"{MANIFEST_PREFIX}00001.json").write_text('{"step": 4, "ra')
    assert "not readable JSON" in checkpoint_problem(str(ckpt))


class _Exploit:
    """Pickles as a call of os.system: what a checkpoint planted by someone with write access could hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_being_unpickled(tmp_path):
    import torch

    from llmforge.train.checkpoint import checkpoint_problem, unsafe_pickle
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000004").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "client": _Exploit(str(marker))},
               ckpt / "step_00000004" / "mp_rank_00_model_states.pt")
    problem = unsafe_pickle(ckpt)
    assert problem and "would run code" in problem and "system" in problem
    assert not marker.exists()
    torch.save({"module": {"w": torch.zeros(2)}, "rng": {"numpy": ["MT19937", [1, 2], 0, 0, 0.0]}},
               ckpt / "step_00000004" / "mp_rank_00_model_states.pt")
    assert unsafe_pickle(ckpt) is None
    # A NumPy array (how the RNG state used to be saved) needs a full unpickle too.
    import numpy as np
    torch.save({"rng": np.zeros(3)}, ckpt / "step_00000004" / "mp_rank_00_model_states.pt")
    assert "numpy" in unsafe_pickle(ckpt)
    assert checkpoint_problem(str(ckpt), checksums=True) is not None  # no manifest, and unsafe


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    from llmforge.train.checkpoint import rng_states as _rng_states, set_rng_states as _set_rng_states
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    torch.save({"rng": _rng_states()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_states(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_from_a_local_checkpoint_that_would_run_code_is_refused_before_any_worker(tmp_path):
    import pytest
    import torch

    from llmforge.config import load_config
    from llmforge.errors import InputError
    from llmforge.train.trainer import resume_plan
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "planted"
    (ckpt / "step_00000004").mkdir(parents=True)
    torch.save({"client": _Exploit(str(marker))}, ckpt / "step_00000004" / "mp_rank_00_model_states.pt")
    (ckpt / "latest").write_text("step_00000004")
    write_manifest(ckpt, 0, 1, 4)  # complete and matching: only the scan can tell
    cfg = load_config(None, {"output_dir": str(tmp_path / "out"), "train.resume_from": str(ckpt)})
    with pytest.raises(InputError, match="would run code"):
        resume_plan(cfg, "run")
    assert not marker.exists()
