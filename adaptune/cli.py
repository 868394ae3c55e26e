"""The ``adaptune`` command line: thin shims over the engine.

Each command parses its arguments, calls one engine function and maps `AdaptuneError` to a one-line
``adaptune: error: ...`` on stderr with its exit code (2 bad input, 1 runtime failure, 130 interrupted). torch and
timm are imported inside the commands, so ``adaptune --help`` answers at once. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from adaptune.files import to_json

app = typer.Typer(
    name="adaptune",
    help="Parameter-efficient fine-tuning of timm backbones: MoSA, adapters, LoRA. Recipes in, deployable weights out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from adaptune import __version__

        print(f"adaptune {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Parameter-efficient fine-tuning of timm backbones: MoSA, Adapter-X, adapters, LoRA and the VTAB zoo. Recipes
    in, deployable weights out."""


Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (logs go to stderr).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def _err(msg: str) -> None:
    for line in msg.splitlines() or [""]:
        print(f"adaptune: error: {line}", file=sys.stderr)


def _run(fn: Callable[[], Any], debug: bool) -> Any:
    """Call ``fn``; turn known errors into one-line messages and exit codes."""
    from adaptune.errors import AdaptuneError

    try:
        return fn()
    except AdaptuneError as e:
        if debug:
            raise
        _err(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        _err("interrupted; nothing more was saved (a run keeps its last checkpoint: adaptune train --resume RUN_DIR)")
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `adaptune methods | head -1`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout at exit)
        raise typer.Exit(0) from None
    except Exception as e:
        if debug:
            raise
        _err(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        raise typer.Exit(1) from None


def _logger(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def resolve_recipe_path(recipe: str) -> Path:
    """A path, or the name of a shipped recipe (``quickstart`` -> the packaged ``quickstart.yaml``)."""
    from adaptune.recipe import resolve_recipe_path as resolve

    return resolve(recipe)


def _recipes_dir() -> Path:
    return Path(__file__).parent / "recipes"


@app.command()
def train(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe YAML file or shipped recipe name (see `adaptune recipes`).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: --set train.lr=5e-3 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<recipe>-<time>).")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved recipe, matched modules and parameter counts; exit.")
    ] = False,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Processes to launch through torchrun (DDP; one per GPU).")
    ] = 1,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train a recipe.

    Examples:
      adaptune train quickstart
      adaptune train recipes/mosa_vtab.yaml --set data.vtab.task=eurosat --set train.lr=1e-3
      adaptune train recipes/adapterplus_vtab.yaml --dry-run
      adaptune train --resume runs/quickstart-20261124-101500
      adaptune train recipes/mosa_vtab.yaml --nproc 4      (same as: torchrun --nproc_per_node 4 -m adaptune train ...)
    """
    if nproc > 1:
        raise typer.Exit(_launch_torchrun(nproc))

    def go() -> None:
        from adaptune.errors import RecipeError
        from adaptune.recipe import load_recipe

        if resume is not None:
            r = _resume_recipe(resume, recipe, set_, out)
        elif recipe is None:
            raise RecipeError(["missing RECIPE; e.g. adaptune train quickstart (see adaptune recipes)"])
        else:
            r = load_recipe(resolve_recipe_path(recipe), set_ or [])
        if dry_run:
            _dry_run(r, json_)
            return
        from adaptune.train import train as train_fn

        result = train_fn(
            r,
            out_dir=resume or out,
            resume=resume is not None,
            log=_logger(quiet),
            progress=not quiet and sys.stderr.isatty(),
        )
        if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
            return
        if json_:
            print(to_json(result.summary))
        elif not quiet:
            _print_summary(result.summary)

    _run(go, debug)


def _resume_recipe(run_dir: Path, recipe: str | None, overrides: list[str] | None, out: Path | None) -> Any:
    """The recipe stored in the run being resumed; a RECIPE argument must be that same recipe.

    Raises:
        RecipeError: ``--set`` or ``--out`` with ``--resume``; a RECIPE that differs from the run's.
        ArtifactError: ``run_dir`` is not a run directory.
    """
    from adaptune import artifacts
    from adaptune.errors import ArtifactError, RecipeError
    from adaptune.loading import run_recipe
    from adaptune.recipe import load_recipe
    from adaptune.train import recipe_differences

    if overrides:
        raise RecipeError(["--set cannot change a run being resumed; start a new run with another --out instead"])
    if out is not None and out.resolve() != run_dir.resolve():
        raise RecipeError([f"--out {out} with --resume {run_dir}: a resumed run stays in its directory; drop --out"])
    if not run_dir.is_dir():
        raise ArtifactError(f"--resume: no such run directory {str(run_dir)!r}")
    stored = run_recipe(run_dir, artifacts.read_manifest(run_dir))
    if recipe is not None:
        given = load_recipe(resolve_recipe_path(recipe))
        changed = recipe_differences(given.to_dict(), stored.to_dict(), ignore=("name", "output"))
        if changed:
            raise RecipeError(
                [
                    f"{recipe}: differs from the recipe of the run being resumed ({', '.join(changed[:6])}); leave "
                    f"RECIPE out to resume {run_dir}, or train it as a new run with another --out"
                ]
            )
    return stored


def _launch_torchrun(nproc: int) -> int:
    """Re-run this command under ``torch.distributed.run`` with ``nproc`` processes; return its exit code."""
    import subprocess

    args = list(sys.argv[1:])
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "adaptune", *args]
    return subprocess.call(cmd)


def _dry_run(r: Any, as_json: bool) -> None:
    from adaptune.backbone import parameter_line
    from adaptune.loading import build

    b = build(r)
    plan = "fold into the backbone (plain timm weights)" if b.spec.foldable else "merged model (adapters kept)"
    report = {
        "recipe": r.to_dict(),
        "matched_modules": b.touched,
        "trainable_backbone_params": b.backbone_params,
        "trainable_params": b.trainable,
        "total_params": b.total,
        "num_classes": b.info.num_classes,
        "input": b.input.to_dict(),
        "merge_plan": plan,
    }
    if as_json:
        print(to_json(report))
        return
    print(r.to_yaml().rstrip())
    print(f"# matched modules ({len(b.touched)}):")
    for name in b.touched:
        print(f"#   {name or '<whole model>'}")
    if b.backbone_params:
        print(
            f"# trainable backbone parameters ({len(b.backbone_params)}): {', '.join(b.backbone_params[:6])}"
            + (", ..." if len(b.backbone_params) > 6 else "")
        )
    print(f"# {parameter_line(b.trainable, b.total)}")
    shape = "x".join(map(str, b.input.shape))
    print(f"# classes: {b.info.num_classes}, input: {shape}, merge plan: {plan}")


def _print_summary(s: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    rows = [
        ("run directory", s["run_dir"]),
        ("best val top-1", f"{pct(s['best_val_top1'])} (epoch {s['best_val_epoch']})"),
        ("test top-1 (best weights)", pct(s["test_top1_best"])),
        ("test top-1 (last weights)", pct(s["test_top1_last"])),
        ("trainable params", f"{s['trainable_params']:,} of {s['total_params']:,}"),
        ("time", f"{s['wall_time_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


@app.command("eval")
def eval_(
    path: Annotated[Path, typer.Argument(help="Run directory, merged .safetensors file or exported timm directory.")],
    split: Annotated[str, typer.Option("--split", help="Data split to evaluate (train, val, test, ...).")] = "test",
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Run directory only: best (default), last, or final.")
    ] = "best",
    data_root: Annotated[
        str | None,
        typer.Option(
            "--data-root",
            "--data",
            help="Use this data root instead of the data source's root (data.vtab.root, data.folder.root).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory for the CSV/JSON/PNG files (default: beside the artifact).")
    ] = None,
    img_size: Annotated[
        int | None, typer.Option("--img-size", min=8, help="Evaluate at this input size instead of the trained one.")
    ] = None,
    json_: Json = False,
    debug: Debug = False,
) -> None:
    """Evaluate a run or a deployed model: loss, top-1/5, per-class and macro accuracy, confusion matrix, speed.

    Examples:
      adaptune eval runs/quickstart-20261124-101500
      adaptune eval merged.safetensors --split val --json
      adaptune eval exported/ --data-root /data/vtab --out eval/
    """

    def go() -> None:
        from adaptune.evaluate import evaluate_artifact, print_report

        result = evaluate_artifact(
            path, split=split, checkpoint=checkpoint, data_root=data_root, out=out, img_size=img_size
        )
        if json_:
            print(to_json(result))
        else:
            print_report(result)

    _run(go, debug)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (only read).")],
    out: Annotated[Path, typer.Option("--out", help="The merged .safetensors file to write.")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best (default), last, or final.")] = "best",
    no_fold: Annotated[bool, typer.Option("--no-fold", help="Keep linear adapters as modules (form merged).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Dtype of the written weights: fp32, bf16 or fp16.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    json_: Json = False,
    debug: Debug = False,
) -> None:
    """Merge a run into one deployable file, checked against the unmerged model (exit 1, nothing written, if not).

    Examples:
      adaptune merge runs/lora-cifar --out lora-cifar.safetensors
      adaptune merge runs/mosa-cifar --out mosa-cifar.safetensors --dtype bf16
    """

    def go() -> None:
        from adaptune.merge import format_merge_report
        from adaptune.merge import merge as merge_fn

        report = merge_fn(run_dir, out, checkpoint=checkpoint, fold=not no_fold, dtype=dtype, overwrite=overwrite)
        print(to_json(report) if json_ else format_merge_report(report))

    _run(go, debug)


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="Run directory or merged .safetensors file.")],
    format_: Annotated[
        str, typer.Option("--format", help="timm, onnx, exported-program or peft (LoRA on whole modules).")
    ],
    out: Annotated[Path, typer.Option("--out", help="File (onnx, exported-program) or new directory (timm, peft).")],
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run directory only: best, last, final.")] = "best",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    json_: Json = False,
    debug: Debug = False,
) -> None:
    """Export for deployment, verified against PyTorch on a fixed batch (exit 1, nothing written, if it differs).

    Examples:
      adaptune export runs/lora-cifar --format timm --out lora-cifar/
      adaptune export mosa-cifar.safetensors --format onnx --out mosa-cifar.onnx
    """

    def go() -> None:
        from adaptune.export import export as export_fn
        from adaptune.export import format_export_report

        report = export_fn(source, format_, out, checkpoint=checkpoint, overwrite=overwrite)
        print(to_json(report) if json_ else format_export_report(report))

    _run(go, debug)


@app.command()
def sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or shipped recipe name (data.source: vtab).")],
    tasks: Annotated[str, typer.Option("--tasks", help="Task folders (cifar,eurosat) or a preset: vtab-1k, ...")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key for every task.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep directory (default: runs/<recipe>-sweep).")] = None,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train a recipe on several tasks, one run each; re-run to resume; write results.json/.csv with both VTAB means.

    Examples:
      adaptune sweep recipes/adapterplus_vtab.yaml --tasks vtab-1k --set data.vtab.root=/data/vtab-1k
      adaptune sweep recipes/mosa_vtab.yaml --tasks cifar,eurosat --out runs/mosa-two
    """

    def go() -> None:
        from adaptune.sweep import format_table
        from adaptune.sweep import sweep as sweep_fn

        log, bars = _logger(quiet), not quiet and sys.stderr.isatty()
        results = sweep_fn(resolve_recipe_path(recipe), [tasks], set_ or [], out, log=log, progress=bars)
        if json_:
            print(to_json(results))
        elif not quiet:
            print(format_table(results))

    _run(go, debug)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (each with a metrics.jsonl).")],
    out: Annotated[Path, typer.Option("--out", help="Image to write: .png (also .svg, .pdf).")] = Path("curves.png"),
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric", help="Panel (loss, accuracy, lr) or logged key (val_top5, kl); repeatable; default: all three."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    debug: Debug = False,
) -> None:
    """Loss, accuracy and learning-rate curves of one or several runs, overlaid.

    Examples:
      adaptune plot runs/lora-cifar --out curves.png
      adaptune plot runs/lora-a runs/mosa-a --out compare.png --metric loss --metric val_top5
    """

    def go() -> None:
        from adaptune.plot import plot as plot_fn

        print(plot_fn(runs, out, metrics=metric, overwrite=overwrite))

    _run(go, debug)


@app.command()
def push(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by adaptune export --format timm or peft.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository: NAME or USER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the files that would be uploaded; send nothing.")
    ] = False,
    json_: Json = False,
    debug: Debug = False,
) -> None:
    """Publish a timm or PEFT export, model card included, on the Hugging Face Hub ([hub] extra; token: HF_TOKEN).

    Examples:
      adaptune push lora-cifar/ me/lora-cifar --dry-run
      adaptune push lora-cifar/ me/lora-cifar --private
    """

    def go() -> None:
        from adaptune import hub

        if dry_run:
            plan = hub.plan_upload(export_dir)
            print(to_json(plan) if json_ else hub.format_plan(plan, repo_id))
            return
        report = hub.push(export_dir, repo_id, private=private)
        print(to_json(report) if json_ else hub.format_push_report(report))

    _run(go, debug)


@app.command()
def methods(
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone", help="Also count each method's trainable parameters on this timm model (no weights)."
        ),
    ] = None,
    json_: Json = False,
    debug: Debug = False,
) -> None:
    """List the registered adapter methods.

    Examples:
      adaptune methods
      adaptune methods --backbone vit_base_patch16_224
    """

    def go() -> None:
        from adaptune.methods import get_method, list_methods

        rows = [_method_row(get_method(n), backbone) for n in list_methods()]
        if json_:
            print(to_json(rows))
            return
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            count = "" if backbone is None else f"{r['params'] if r['params'] is not None else r['error']:>12}  "
            if isinstance(r.get("params"), int):
                count = f"{r['params']:>12,}  "
            print(f"{r['name']:<{width}}  {count}{r['summary']}")

    _run(go, debug)


def _method_row(spec: Any, backbone: str | None) -> dict[str, Any]:
    """One row of ``adaptune methods``: name, summary, foldable, and with a backbone its parameter count."""
    row: dict[str, Any] = {"name": spec.name, "summary": spec.summary, "foldable": spec.foldable}
    if backbone is None:
        return row
    from adaptune.errors import AdaptuneError
    from adaptune.loading import count_method_parameters

    try:
        counts = count_method_parameters(backbone, spec.name)
        row.update(params=counts["method"], head_params=counts["head"], backbone_params=counts["total"])
    except AdaptuneError as e:
        row.update(params=None, error=f"n/a ({str(e).splitlines()[0][:60]})")
    return row


@app.command()
def recipes(json_: Json = False, debug: Debug = False) -> None:
    """List the shipped recipes (use a name directly: adaptune train quickstart)."""

    def go() -> None:
        rows = []
        for path in sorted(_recipes_dir().glob("*.yaml")):
            first = path.read_text().splitlines()[0] if path.stat().st_size else ""
            rows.append((path.stem, first.lstrip("# ").strip(), str(path)))
        if json_:
            print(to_json([{"name": n, "description": d, "path": p} for n, d, p in rows]))
            return
        width = max(len(n) for n, _, _ in rows)
        for name, desc, _ in rows:
            print(f"{name:<{width}}  {desc}")

    _run(go, debug)


def main(argv: list[str] | None = None) -> None:
    """The console entry point: SIGTERM behaves like Ctrl-C everywhere (exit 130 with what was saved), and usage
    errors (unknown options, missing arguments) are one ``adaptune: error:`` line with exit code 2."""
    exc = _click_exceptions()
    signal.signal(signal.SIGTERM, _terminate)
    _show_library_warnings()
    try:
        code = app(args=argv, prog_name="adaptune", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx is not None else e.format_message())
        sys.exit(0)
    except exc.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "adaptune"
        _err(f"{e.format_message()} (see {command} --help)")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _err("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _show_library_warnings() -> None:
    """Warnings adaptune's modules log (``logging.getLogger("adaptune...")``) as ``warning: ...`` lines on stderr."""
    import logging

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is at the time of each record (a later main() in the same process, e.g.
        in tests or notebooks, may have replaced it; a handler bound at the first call would write to a closed file)."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    log = logging.getLogger("adaptune")
    if not any(getattr(h, "adaptune_cli", False) for h in log.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.adaptune_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


def _click_exceptions():
    """The click exceptions Typer raises (recent Typer vendors click as ``typer._click``)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older Typer: the click package itself
        from click import exceptions
    return exceptions


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
