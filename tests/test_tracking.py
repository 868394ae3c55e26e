"""Tracking backends (adaptune.tracking) with the real libraries: CSV contents, TensorBoard event files read back with
tensorboard's own EventAccumulator, a W&B offline run directory read back with W&B's own record definitions, and a
tiny training run's metrics.jsonl replayed through all three."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_recipe

from adaptune import tracking
from adaptune.errors import AdaptuneError, RecipeError
from adaptune.tracking import is_epoch_record, open_trackers, scalars

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason="tensorboard not installed (pip install 'adaptune[tensorboard]')")
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed (pip install 'adaptune[wandb]')")

RECIPE = {"name": "t", "train": {"lr": 0.001, "epochs": 2}, "method": {"name": "lora", "rank": 4}, "output": {}}


def step_record(step: int, loss: float, epoch: int = 0) -> dict:
    return {"step": step, "epoch": epoch, "loss": loss, "ce": loss - 0.1, "kl": 0.1, "lr": 1e-3 / step}


def epoch_record(epoch: int, step: int, val: bool = True) -> dict:
    r = {"epoch": epoch, "step": step, "train_loss": 2.0 / epoch, "train_top1": 10.0 * epoch, "train_ce": 1.5 / epoch}
    if val:
        r.update(val_loss=1.0 / epoch, val_top1=20.0 * epoch, val_top5=30.0 * epoch, best=True)
        r["val_diagnostics"] = {"expert_use": {"blocks.0": [0.25, 0.75]}}
    return r


def replay(tracker: tracking.Tracker, records: list[dict]) -> None:
    for r in records:
        tracker.log(r)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# names, checks, failures


def test_scalar_names_keep_step_loss_apart_from_epoch_means():
    assert not is_epoch_record(step_record(3, 1.0)) and is_epoch_record(epoch_record(1, 4))
    assert scalars(step_record(4, 1.0)) == {"step/loss": 1.0, "step/ce": 0.9, "step/kl": 0.1, "lr": 2.5e-4}
    s = scalars(epoch_record(2, 8))
    assert s == {
        "train/loss": 1.0,
        "train/top1": 20.0,
        "train/ce": 0.75,
        "val/loss": 0.5,
        "val/top1": 40.0,
        "val/top5": 60.0,
        "val/diagnostics/expert_use/blocks.0/0": 0.25,
        "val/diagnostics/expert_use/blocks.0/1": 0.75,
    }
    assert scalars({"epoch": 1, "step": 4, "train_loss": None, "val_loss": float("nan")}) == {}


def test_unknown_tracker_and_missing_package_are_one_line_errors(monkeypatch, tmp_path):
    with pytest.raises(
        RecipeError, match=r"output.report_to\[1\]: unknown tracker 'tensorbord'.*did you mean 'tensorboard'"
    ):
        open_trackers(["csv", "tensorbord"], tmp_path, RECIPE, resume=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a)
    )
    with pytest.raises(RecipeError) as e:
        tracking.check(["tensorboard", "wandb", "csv"])
    assert e.value.problems == [
        "output.report_to[0]: 'tensorboard' needs the tensorboard package; run: pip install 'adaptune[tensorboard]'",
        "output.report_to[1]: 'wandb' needs the wandb package; run: pip install 'adaptune[wandb]'",
    ]
    assert tracking.problems(["tensorboard", "wandb"], installed=False) == []  # what the recipe validator asks
    assert list(tmp_path.iterdir()) == []  # nothing opened


def test_no_backends_is_a_tracker_that_does_nothing(tmp_path):
    with open_trackers([], tmp_path, RECIPE, resume=False) as t:
        t.log(step_record(1, 1.0))
        assert t.names == []
    assert list(tmp_path.iterdir()) == []


class _Flaky:
    def __init__(self, fail_at: int):
        self.fail_at, self.seen = fail_at, 0

    def log(self, record):
        self.seen += 1
        if self.seen == self.fail_at:
            raise OSError(28, "No space left on device")

    def close(self):
        raise RuntimeError("already closed\nsecond line")


def test_a_failing_backend_is_reported_once_and_turned_off(monkeypatch, tmp_path):
    flaky = _Flaky(fail_at=2)
    monkeypatch.setitem(tracking.BACKENDS, "flaky", tracking.Backend("flaky", "test", lambda *a: flaky))
    said: list[str] = []
    t = open_trackers(["flaky", "csv", "flaky"], tmp_path, RECIPE, resume=False, say=said.append)
    assert t.names == ["flaky", "csv"]
    replay(t, [step_record(s, 1.0) for s in (1, 2, 3, 4)])  # must not raise
    assert flaky.seen == 2 and t.names == ["csv"]
    assert said == [
        "warning: flaky tracking failed at step 2 (OSError: [Errno 28] No space left on device); flaky logging is off "
        "for the rest of the run (metrics.jsonl has every record)"
    ]
    t.close()
    assert [r["step"] for r in read_csv(tmp_path / "metrics.csv")] == ["1", "2", "3", "4"]  # the others went on
    t2 = open_trackers(["flaky"], tmp_path, RECIPE, resume=True, say=said.append)
    t2.close()  # a failing close is reported, not raised
    assert said[-1].startswith("warning: flaky tracking failed to close (RuntimeError: already closed);")


def test_trackers_import_nothing_heavy():
    code = (
        "import sys, adaptune.tracking, adaptune.plot; "
        "print([m for m in ('torch', 'tensorboard', 'wandb', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------------
# csv


def test_csv_header_grows_with_new_keys_and_resume_continues(tmp_path):
    with open_trackers(["csv"], tmp_path, RECIPE, resume=False) as t:
        replay(t, [step_record(1, 1.0), step_record(2, 0.8), epoch_record(1, 2, val=False)])
        replay(t, [{**step_record(3, float("nan"), 1), "balance": 0.5}, epoch_record(2, 4)])
    steps, epochs = read_csv(tmp_path / "metrics.csv"), read_csv(tmp_path / "epochs.csv")
    assert list(steps[0]) == ["step", "epoch", "loss", "ce", "kl", "lr", "balance"]
    assert [(r["step"], r["loss"], r["balance"]) for r in steps] == [
        ("1", "1.0", ""),
        ("2", "0.8", ""),
        ("3", "", "0.5"),
    ]
    assert float(steps[0]["lr"]) == 1e-3  # full precision
    assert [r["epoch"] for r in epochs] == ["1", "2"] and epochs[0]["val_top1"] == "" and epochs[1]["best"] == "true"
    assert json.loads(epochs[1]["val_diagnostics"]) == {"expert_use": {"blocks.0": [0.25, 0.75]}}
    # a crash after step 3 (checkpoint at step 2) tore the last row; the resumed run logs step 3 again
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("4,1,0.7")
    with open_trackers(["csv"], tmp_path, RECIPE, resume=True, resume_step=2) as t:
        replay(t, [step_record(3, 0.6, 1), step_record(4, 0.5, 1)])
    assert [(r["step"], r["loss"]) for r in read_csv(tmp_path / "metrics.csv")] == [
        ("1", "1.0"),
        ("2", "0.8"),
        ("3", "0.6"),
        ("4", "0.5"),
    ]
    assert [r["epoch"] for r in read_csv(tmp_path / "epochs.csv")] == ["1"]  # epoch 2 (step 4) came after step 2
    with open_trackers(["csv"], tmp_path, RECIPE, resume=False) as t:  # a fresh run starts new files
        t.log(step_record(1, 9.0))
    assert [r["loss"] for r in read_csv(tmp_path / "metrics.csv")] == ["9.0"]
    assert not (tmp_path / "epochs.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# tensorboard


def tb_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}, ea


def by_step(pairs: list[tuple[int, float]]) -> dict[int, float]:
    """(step, value) pairs as a dict, for pytest.approx (TensorBoard stores float32); each step once, in order."""
    steps = [s for s, _ in pairs]
    assert steps == sorted(set(steps))
    return dict(pairs)


@needs_tb
def test_tensorboard_events_read_back_and_resume_purges(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    with open_trackers(["tensorboard"], tmp_path, RECIPE, resume=False) as t:
        replay(t, [step_record(s, 1.0 / s) for s in range(1, 7)] + [epoch_record(1, 3)])
    with open_trackers(["tensorboard"], tmp_path, RECIPE, resume=True, resume_step=4) as t:  # steps 5, 6 again
        replay(t, [step_record(s, 2.0 / s) for s in range(5, 9)] + [epoch_record(2, 8)])
    got, ea = tb_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in got["step/loss"]] == list(range(1, 9))
    assert by_step(got["step/loss"]) == pytest.approx({s: (1.0 if s <= 4 else 2.0) / s for s in range(1, 9)})
    assert got["val/top1"] == [(3, 20.0), (8, 40.0)] and by_step(got["train/ce"]) == pytest.approx({3: 1.5, 8: 0.75})
    assert by_step(got["lr"]) == pytest.approx({s: 1e-3 / s for s in range(1, 9)})
    assert "val/diagnostics/expert_use/blocks.0/1" in got
    text = ea.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rank: 4" in text and text.startswith("    name: t\n")
    start = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hp["train.lr"].number_value == 0.001 and hp["method.name"].string_value == "lora"


# ----------------------------------------------------------------------------------------------------------------
# wandb


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file: W&B's record log (a ``:W&B`` header, then
    LevelDB-style log blocks of 32 KiB whose records have a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, out = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # still being written
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last fragment of one
            out.append(pb.Record.FromString(b"".join(parts)))
            parts = []
    return out


def finished_records(run_file: Path, timeout: float = 20.0) -> list:
    """The records once the log holds its exit record: ``run.finish()`` returns before W&B's service has written
    the whole file (seen with wandb 0.31 in offline mode); the service finishes it within moments."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def wandb_run(run_dir: Path, run_id: str, which: int = -1) -> tuple[dict, dict[int, dict[str, float]]]:
    """(config, history by step) of the offline run folder ``which`` of run ``run_id``."""
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    folder = folders[which]
    assert (folder / "files").is_dir() and (folder / "logs").is_dir()
    config: dict = {}
    history: dict[int, dict[str, float]] = {}
    for r in finished_records(folder / f"run-{run_id}.wandb"):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            assert r.run.run_id == run_id and r.run.project == "adaptune" and r.run.display_name == run_dir.name
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(int(items.pop("_step")), {}).update(items)
    return config, history


@needs_wandb
def test_wandb_offline_run_holds_config_and_history_and_resumes_with_the_same_id(wandb_offline, tmp_path):
    run_dir = tmp_path / "run-a"
    run_dir.mkdir()
    with open_trackers(["wandb"], run_dir, RECIPE, resume=False) as t:
        replay(t, [step_record(1, 1.0), step_record(2, 0.5), epoch_record(1, 2)])
    run_id = (run_dir / tracking.WANDB_ID_FILE).read_text().strip()
    config, history = wandb_run(run_dir, run_id)
    assert config["train"] == RECIPE["train"] and config["method"] == RECIPE["method"]
    assert sorted(history) == [1, 2]
    assert {k: v for k, v in history[1].items() if not k.startswith("_")} == scalars(step_record(1, 1.0))
    assert history[2]["val/top1"] == 20.0 and history[2]["step/loss"] == 0.5 and history[2]["train/loss"] == 2.0
    with open_trackers(["wandb"], run_dir, RECIPE, resume=True, resume_step=2) as t:
        t.log(step_record(3, 0.25, 1))
    assert (run_dir / tracking.WANDB_ID_FILE).read_text().strip() == run_id  # the same W&B run continues
    _, resumed = wandb_run(run_dir, run_id, which=-1)
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert resumed[3]["step/loss"] == 0.25


@needs_wandb
def test_wandb_that_cannot_start_is_a_one_line_error(monkeypatch, tmp_path):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(
        AdaptuneError,
        match=r"^output.report_to: wandb could not start \(api_key not configured .*"
        r"set WANDB_MODE=offline",
    ):
        open_trackers(["csv", "wandb"], tmp_path, RECIPE, resume=False)


# ----------------------------------------------------------------------------------------------------------------
# end to end: a tiny training run's metrics.jsonl through every backend (the loop itself is wired by train.py)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from adaptune.train import train

    tmp = tmp_path_factory.mktemp("tiny")
    recipe = tiny_recipe("linear", tmp, train={"log_every": 1, "eval_every": 2, "epochs": 2})
    result = train(recipe)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return result.run_dir, recipe, records


@needs_tb
@needs_wandb
def test_a_training_runs_records_reach_every_backend(tiny_run, wandb_offline):
    run_dir, recipe, records = tiny_run
    steps = [r for r in records if not is_epoch_record(r)]
    epochs = [r for r in records if is_epoch_record(r)]
    assert len(steps) == 8 and [e["epoch"] for e in epochs] == [1, 2] and "val_top1" not in epochs[0]
    with open_trackers(["csv", "tensorboard", "wandb"], run_dir, recipe.to_dict(), resume=False) as t:
        replay(t, records)
    csv_steps, csv_epochs = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "epochs.csv")
    assert [float(r["loss"]) for r in csv_steps] == [r["loss"] for r in steps]
    assert [float(r["lr"]) for r in csv_steps] == [r["lr"] for r in steps]
    assert csv_epochs[0]["val_top1"] == "" and float(csv_epochs[1]["val_top1"]) == epochs[1]["val_top1"]
    got, _ = tb_scalars(run_dir / "tensorboard")
    assert by_step(got["step/loss"]) == pytest.approx({r["step"]: r["loss"] for r in steps})
    assert by_step(got["train/loss"]) == pytest.approx({r["step"]: r["train_loss"] for r in epochs})
    assert by_step(got["val/top1"]) == pytest.approx({epochs[1]["step"]: epochs[1]["val_top1"]})
    config, history = wandb_run(run_dir, (run_dir / tracking.WANDB_ID_FILE).read_text().strip())
    assert config["train"] == recipe.to_dict()["train"]
    assert sorted(history) == [r["step"] for r in steps]
    assert history[epochs[1]["step"]]["val/top1"] == epochs[1]["val_top1"]
    assert history[epochs[1]["step"]]["lr"] == steps[-1]["lr"]
    from matplotlib.image import imread

    from adaptune.plot import PANEL_HEIGHT, PANEL_WIDTH, plot

    png = plot([run_dir], run_dir.parent / "curves.png")
    assert imread(png).shape == (round(3 * PANEL_HEIGHT * 100), round(PANEL_WIDTH * 100), 4)  # loss, top-1, lr
