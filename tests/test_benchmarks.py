"""The benchmark suite (benchmarks/suite.py): its report from a hand-made result, and (slow) one real quick part."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ERROR = "adaptune.errors.RecipeError: <recipe>: data.name: unknown"


@pytest.fixture(scope="module")
def suite():
    benchmarks = str(REPO / "benchmarks")
    sys.path.insert(0, benchmarks)  # suite.py imports its sibling scripts (methods_step, speed_switches) by name
    spec = importlib.util.spec_from_file_location("suite", REPO / "benchmarks" / "suite.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["suite"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    yield module
    sys.path.remove(benchmarks)


def spread(median: float, p10: float | None = None, p90: float | None = None) -> dict[str, float]:
    return {"median": median, "p10": median if p10 is None else p10, "p90": median if p90 is None else p90}


def switch_row(switch: str, key: str, ms: float, ratio: dict, mib: float) -> dict:
    return {
        "switch": switch,
        "recipe_key": key,
        "step_ms": spread(ms),
        "images_per_s": 8 / (ms / 1e3),
        "vs_off": ratio,
        "memory_mib": mib,
        "memory_vs_off": mib / 100.0,
        "first_s": 0.1,
        "max_grad_diff": 0.0,
        "grad_scale": 1.5,
    }


def hand_made_results() -> dict:
    switches = {
        "case": {"model": "tf_efficientnet_lite0", "img_size": 64, "batch": 8, "sized": False, "recipes": True},
        "key": "cnn",
        "method": "adapter",
        "options": "recipe quickstart",
        "device": "cpu",
        "threads": 2,
        "rounds": 3,
        "warmup": 1,
        "rows": [
            switch_row("off", "-", 70.0, spread(1.0), 100.0),
            switch_row("grad_checkpointing", "backbone.grad_checkpointing", 100.0, spread(1.45, 1.3, 1.6), 61.0),
        ],
        "skipped": [{"switch": "compile", "reason": "RuntimeError: no compiler"}],
        "memory": "each configuration in its own subprocess",
    }
    return {
        "command": "python benchmarks/suite.py --quick",
        "mode": "quick, CPU sizes",
        "machine": {
            "date": "2026-12-02 12:00:00 +0000",
            "cpu": "Test CPU",
            "cpu_count": 2,
            "gpu": None,
            "torch": "2.14.1",
            "timm": "1.0",
            "adaptune": "0.1",
            "git": "abc123",
            "python": "3.12",
            "load_average": [0.5, 0.5, 0.5],
        },
        "parts": {
            "speed_switches": {
                "status": "ok",
                "command": "python benchmarks/speed_switches.py --quick",
                "seconds": 40.0,
                "result": {"cases": [switches]},
            },
            "merge_latency": {
                "status": "failed",
                "command": "python benchmarks/merge_latency.py --json",
                "seconds": 3.0,
                "error": ERROR,
            },
        },
    }


def test_the_report_has_a_table_per_part_and_names_the_failed_one(suite):
    md = suite.render_markdown(hand_made_results())
    assert "Test CPU" in md and "2.14.1" in md
    # the summary table: one row per part, the failed one with its error line
    assert "| `speed_switches` | ok | 40 |" in md
    assert f"| `merge_latency` | **failed**: {ERROR} | 3 |" in md
    # the ok part's section: its table's columns, its rows as ratios with their spread, and what bounds them
    header = "| switch | recipe key | step ms | images/s | time vs off | peak MiB | mem vs off | first s "
    assert header in md
    assert "| grad_checkpointing | backbone.grad_checkpointing | 100.0 | 80.0 | 1.45 (1.30-1.60) | 61 | 0.61 |" in md
    assert "- `compile`: RuntimeError: no compiler" in md
    assert f"What bounds these ratios: {suite.PARTS['speed_switches'].bounds}" in md
    # the failed part's section says so and points at its log, and the suite still rendered the rest
    assert f"**Failed** after 3 s: `{ERROR}` (log: `merge_latency.err`)" in md
    assert md.index("(`speed_switches`)") < md.index("(`merge_latency`)")


def test_a_result_the_renderer_cannot_read_is_reported_not_raised(suite):
    results = hand_made_results()
    results["parts"]["speed_switches"]["result"] = {"cases": [{"unexpected": 1}]}
    md = suite.render_markdown(results)
    assert "**Failed** to render the results: `KeyError" in md


def test_the_data_time_section_follows_the_prefix_cache_part(suite):
    def run(mode: str, share: float) -> dict:
        return {
            "mode": mode,
            "process_s": 20.0,
            "train_s": 15.0,
            "test_top1_best": 72.9,
            "test_top1_last": 72.9,
            "data_time_fraction": share,
            "train_images_per_s": 300.0,
            "cache": f"prefix cache: {mode}",
        }

    runs = {"off": run("off", 0.006), "auto": run("auto", 0.012)}
    result = {
        "recipe": "quickstart",
        "overrides": ["train.epochs=1"],
        "max_abs_weight_diff": 0.0,
        "test_top1_diff": 0.0,
        "process_ratio": spread(0.8, 0.72, 0.88),
        "train_ratio": spread(0.7, 0.63, 0.77),
        "repeats": [{"order": ["off", "auto"], "runs": runs}],
    }
    results = hand_made_results()
    results["parts"] = {
        "prefix_cache": {
            "status": "ok",
            "command": "python benchmarks/prefix_cache.py",
            "seconds": 50.0,
            "result": result,
        }
    }
    md = suite.render_markdown(results)
    ratios = "auto / off: process 0.80 (0.72-0.88), train 0.70 (0.63-0.77); largest adapter weight difference 0.0e+00"
    assert ratios in md
    assert "| 0 | off | 0.6% | 300 | 15.0 |" in md and "| 0 | auto | 1.2% | 300 | 15.0 |" in md
    results["parts"]["prefix_cache"] = {"status": "failed", "command": "x", "seconds": 1.0, "error": "boom"}
    assert "Not measured: the prefix_cache part failed." in suite.render_markdown(results)


def test_the_error_line_is_the_exception_of_the_last_traceback(suite):
    stderr = (
        'warming up\nTraceback (most recent call last):\n  File "x.py", line 1, in <module>\n    main()\n'
        "adaptune.errors.RecipeError: <recipe>: data.synthetic: wrong\n<recipe>: data.name: unknown key\n"
    )
    assert suite.error_line(stderr, "?") == "adaptune.errors.RecipeError: <recipe>: data.synthetic: wrong"
    assert suite.error_line("a\nlast words\n\n", "?") == "last words"
    assert suite.error_line("", "exit code 3") == "exit code 3"


def test_every_part_writes_json_where_the_suite_reads_it(suite, tmp_path):
    for part in suite.PARTS.values():
        for quick in (True, False):
            for cuda in (True, False):
                argv = part.command(quick, cuda, tmp_path / f"{part.name}.json")
                assert "--json" in argv
                if not part.reads_stdout:
                    assert argv[argv.index("--json") + 1] == str(tmp_path / f"{part.name}.json")


@pytest.mark.slow
def test_a_quick_suite_part_writes_a_report_with_ratios(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "benchmarks/suite.py", "--quick", "--parts", "speed_switches", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    part = results["parts"]["speed_switches"]
    assert part["status"] == "ok", part.get("error")
    for case in part["result"]["cases"]:
        ratios = {r["switch"]: r["vs_off"]["median"] for r in case["rows"]}
        assert ratios["off"] == 1.0 and "grad_checkpointing" in ratios
        assert all(r > 0 for r in ratios.values())
        assert all(r["memory_mib"] is not None for r in case["rows"])
    md = (out / "RESULTS.md").read_text()
    assert "| switch | recipe key | step ms |" in md and "time vs off" in md and "What bounds these ratios" in md
    assert (out / "speed_switches.json").exists() and (out / "speed_switches.err").exists()
