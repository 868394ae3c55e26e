"""Crash safety: a process killed at any point of an atomic write or a checkpoint swap leaves a complete copy under a
name a reader finds, and the next run puts it back and cleans up.

Crashes are real: a forked child runs the write with `adaptune.files._step` replaced by ``os._exit`` at one named
point, so no ``except``/``finally`` cleanup runs, as with ``kill -9``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adaptune import artifacts, files
from adaptune.artifacts import find_checkpoint, load_trainer_state, recover_checkpoints, save_checkpoint

WRITE_STEPS = ("write", "fsync", "rename")
SWAP_STEPS = ("swap-written", "swap-moved-old", "swap-renamed")


def crash_at(step: str, count: int, fn) -> None:
    """Run ``fn`` in a forked child that dies (``os._exit``) at the ``count``-th time it reaches ``step``."""
    pid = os.fork()
    if pid == 0:  # child
        seen = [0]

        def die(name: str) -> None:
            if name == step:
                seen[0] += 1
                if seen[0] == count:
                    os._exit(17)

        files._step = die  # type: ignore[assignment]
        try:
            fn()
        finally:
            os._exit(0)  # reached the end without crashing
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 17, f"the child never reached {step!r} #{count}"


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_atomic_write_never_leaves_a_torn_file(tmp_path, step):
    path = tmp_path / "summary.json"
    files.write_json(path, {"version": "old"})
    crash_at(step, 1, lambda: files.write_json(path, {"version": "new", "pad": "x" * 100_000}))
    assert path.read_text() == '{\n  "version": "old"\n}\n'  # the old file, whole
    leftovers = [p for p in tmp_path.iterdir() if files.is_temporary(p)]
    assert len(leftovers) == 1, "a crashed write leaves only a recognisable temporary file"
    assert files.remove_leftovers(tmp_path) == leftovers and sorted(p.name for p in tmp_path.iterdir()) == [
        "summary.json"
    ]


class _Tiny(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), value))


def _save(run: Path, value: float) -> None:
    save_checkpoint(
        run / "checkpoints" / "last",
        _Tiny(value),
        {"format_version": artifacts.FORMAT_VERSION},
        {"optimizer": {}, "loop": {"step": int(value)}, "rng": {}},
    )


def _value(ckpt: Path) -> float:
    tensors, _ = artifacts.load_safetensors(ckpt / artifacts.ADAPTER_WEIGHTS)
    step = load_trainer_state(ckpt)["loop"]["step"]
    assert float(tensors["weight"][0]) == step, "weights and trainer state come from the same save"
    return step


# every point of the swap, and every point of the two atomic writes inside it (weights, then trainer state)
POINTS = [(s, 1) for s in SWAP_STEPS] + [(s, n) for s in WRITE_STEPS for n in (1, 2)]


@pytest.mark.parametrize(("step", "count"), POINTS, ids=[f"{s}-{n}" for s, n in POINTS])
def test_checkpoint_swap_is_crash_safe_at_every_point(tmp_path, step, count):
    run = tmp_path / "run"
    _save(run, 1.0)
    crash_at(step, count, lambda: _save(run, 2.0))
    found = _value(find_checkpoint(run, "last"))  # a reader finds a complete copy, old or new
    newer_written = step in ("swap-moved-old", "swap-renamed")
    assert found == (2.0 if newer_written else 1.0)
    log = recover_checkpoints(run)  # what the next run does first
    assert _value(run / "checkpoints" / "last") == found
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"], log
    _save(run, 3.0)  # and the next save works normally
    assert _value(find_checkpoint(run, "last")) == 3.0


def test_a_crash_before_any_checkpoint_leaves_nothing_to_find(tmp_path):
    run = tmp_path / "run"
    crash_at("swap-written", 1, lambda: _save(run, 1.0))
    assert _value(find_checkpoint(run, "last")) == 1.0  # complete but not renamed yet: still found
    recover_checkpoints(run)
    assert _value(run / "checkpoints" / "last") == 1.0
    crash_at("write", 1, lambda: _save(tmp_path / "other", 1.0))
    with pytest.raises(artifacts.ArtifactError, match="no 'last' checkpoint"):
        find_checkpoint(tmp_path / "other", "last")
    recover_checkpoints(tmp_path / "other")
    assert not list((tmp_path / "other" / "checkpoints").iterdir()), "leftovers removed"


def test_long_names_stay_legal_in_temporary_files(tmp_path):
    path = tmp_path / ("x" * 240 + ".json")  # legal (255 bytes max); a longer temporary name would not be
    files.write_json(path, {"ok": True})
    assert path.is_file()


def test_json_files_never_hold_nan(tmp_path):
    files.write_json(tmp_path / "m.json", {"loss": float("nan"), "top1": float("inf"), "ok": [1.0, float("-inf")]})
    assert (
        tmp_path / "m.json"
    ).read_text() == '{\n  "loss": null,\n  "top1": null,\n  "ok": [\n    1.0,\n    null\n  ]\n}\n'
