"""`adaptune plot` engine (adaptune.plot): curves of runs overlaid from their metrics.jsonl, written as a real PNG that
matplotlib reads back; every error path. The end-to-end run (a real training run plotted) is in test_tracking.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'adaptune[plot]')")

from matplotlib.image import imread

from adaptune.errors import ArtifactError
from adaptune.plot import DPI, PANEL_HEIGHT, PANEL_WIDTH, figure, plot, run_labels


def records(lr0: float = 1e-3, val: bool = True, steps_per_epoch: int = 4, epochs: int = 2) -> list[dict]:
    """Records as the loop writes them: a step record every step, an epoch record at each epoch's last step."""
    out = []
    for e in range(epochs):
        for i in range(1, steps_per_epoch + 1):
            s = e * steps_per_epoch + i
            out.append({"step": s, "epoch": e, "loss": 2.0 / s, "ce": 1.8 / s, "kl": 0.2 / s, "lr": lr0 / s})
        s = (e + 1) * steps_per_epoch
        r = {"epoch": e + 1, "step": s, "train_loss": 1.5 / (e + 1), "train_top1": 30.0 + 10 * e, "train_kl": 0.1}
        if val:
            r.update(val_loss=1.2 / (e + 1), val_top1=40.0 + 10 * e, val_top5=90.0, best=True)
        out.append(r)
    return out


def write_run(path: Path, recs: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def lines_of(ax) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(colour, linestyle) -> (x, y) of every line of an axes."""
    return {(ln.get_color(), ln.get_linestyle()): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}


def test_two_runs_overlaid_into_a_real_png(tmp_path):
    a = write_run(tmp_path / "lora", records())
    b = write_run(tmp_path / "mosa", records(lr0=2e-3, epochs=3))
    out = plot([a, b], tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out).shape == (round(3 * PANEL_HEIGHT * DPI), round(PANEL_WIDTH * DPI), 4)  # RGBA, three panels
    fig = figure([a, b])
    loss, acc, lr = fig.axes[:3]
    assert len(fig.axes) == 3 and [ax.get_ylabel() for ax in fig.axes] == ["loss", "top-1 (%)", "learning rate"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lora", "mosa"]
    got = lines_of(loss)
    assert len(loss.lines) == 6  # per run: step loss, epoch-mean train loss, val loss
    assert got[("C0", "-")] == ([4.0, 8.0], [1.2, 0.6])  # run a's validation loss at the steps ending its epochs
    assert got[("C1", "--")] == ([4.0, 8.0, 12.0], [1.5, 0.75, 0.5])
    assert lines_of(acc)[("C1", "-")][1] == [40.0, 50.0, 60.0]
    lr_b = lines_of(lr)[("C1", "-")]
    assert lr_b[0] == [float(s) for s in range(1, 13)] and lr_b[1] == pytest.approx([2e-3 / s for s in range(1, 13)])


def test_chosen_metrics_and_panels_without_data(tmp_path):
    only_epochs = write_run(tmp_path / "a", [r for r in records(val=False) if "train_loss" in r])  # log_every > steps
    fig = figure([only_epochs])
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "top-1 (%)"]  # no step records: no learning rate
    b = write_run(tmp_path / "b", records())
    fig = figure([b], metrics=["val_top5", "kl", "train_kl", "lr"])
    assert [ax.get_ylabel() for ax in fig.axes] == ["val_top5", "kl", "train_kl", "learning rate"]
    assert fig.axes[1].lines[0].get_xdata().tolist() == list(range(1, 9))  # a step key, at every step
    assert fig.axes[2].lines[0].get_xdata().tolist() == [4, 8]  # an epoch key, at the epochs' steps
    out = plot([b], tmp_path / "kl.png", metrics=["kl"])
    assert imread(out).shape[0] == round(PANEL_HEIGHT * DPI)
    with pytest.raises(
        ArtifactError,
        match=r"--metric: no run logged 'val_top55'; choose from loss, accuracy, lr, .*"
        r"did you mean 'val_top5'",
    ):
        figure([b], metrics=["val_top55"])


def test_a_resumed_run_and_a_torn_last_line(tmp_path):
    recs = records()
    assert [r["step"] for r in recs[5:7]] == [5, 6] and "loss" in recs[5]
    replayed = recs[:7] + [{**r, "loss": 9.0} for r in recs[5:7]] + recs[7:]  # steps 5, 6 logged again on resume
    run = write_run(tmp_path / "run", replayed, tail='{"step": 9, "epo')
    step_line = next(ln for ln in figure([run]).axes[0].lines if ln.get_alpha() is not None)  # the thin step loss
    assert step_line.get_xdata().tolist() == list(range(1, 9))  # each step once, the torn record skipped
    assert step_line.get_ydata().tolist()[4:6] == [9.0, 9.0]  # the later record wins


def test_a_null_value_leaves_a_gap(tmp_path):
    recs = records()
    recs[2]["loss"] = None  # a non-finite loss is written as null
    fig = figure([write_run(tmp_path / "run", recs)])
    step_line = next(ln for ln in fig.axes[0].lines if ln.get_alpha() is not None)
    assert step_line.get_ydata()[2] != step_line.get_ydata()[2]  # NaN


def test_runs_with_the_same_name_are_told_apart():
    assert run_labels([Path("/r/a/run"), Path("/r/b/run"), Path("/r/lora")]) == ["a/run", "b/run", "lora"]
    assert run_labels([Path("/r/x"), Path("/r/x")]) == ["x", "x"]


def test_output_rules(tmp_path):
    run = write_run(tmp_path / "run", records())
    out = tmp_path / "c.png"
    out.write_bytes(b"old")
    with pytest.raises(ArtifactError, match=r"already exists; pass --overwrite to replace it"):
        plot([run], out)
    assert out.read_bytes() == b"old"
    plot([run], out, overwrite=True)
    assert imread(out).ndim == 3
    with pytest.raises(ArtifactError, match=r"--out: directory '.*nowhere' does not exist; create it first"):
        plot([run], tmp_path / "nowhere" / "c.png")
    with pytest.raises(ArtifactError, match=r"expected an image name ending in \.png, \.svg, \.pdf"):
        plot([run], tmp_path / "c.jpeg")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ArtifactError, match=r"is a directory; give an image file name"):
        plot([run], tmp_path / "d.png")
    svg = plot([run], tmp_path / "c.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "c.svg", "d.png", "run"]  # no temporary left


def test_bad_runs(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing: no such run directory"):
        plot([tmp_path / "missing"], tmp_path / "c.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"file: not a directory; give a run directory"):
        plot([tmp_path / "file"], tmp_path / "c.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty: no metrics.jsonl; not a run directory"):
        plot([tmp_path / "empty"], tmp_path / "c.png")
    write_run(tmp_path / "new", [], tail="\n")
    with pytest.raises(ArtifactError, match=r"metrics.jsonl: no records yet; plot again once the run has logged"):
        plot([tmp_path / "new"], tmp_path / "c.png")
    bad = write_run(tmp_path / "bad", records()[:2])
    bad.joinpath("metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ArtifactError, match=r"bad/metrics.jsonl:2: not a JSON record .*; the file is damaged"):
        plot([bad], tmp_path / "c.png")
    with pytest.raises(ArtifactError, match=r"give at least one run directory"):
        plot([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_is_a_one_line_error(monkeypatch, tmp_path):
    run = write_run(tmp_path / "run", records())
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ArtifactError, match=r"^adaptune plot needs matplotlib; run: pip install 'adaptune\[plot\]'$"):
        plot([run], tmp_path / "c.png")
