"""Model cards: the ``README.md`` that ``--format timm`` and ``--format peft`` exports carry, so a folder can be
published on the Hugging Face Hub as it is (``adaptune push``).

The card is YAML front matter (the Hub's metadata) and a Markdown body::

    ---
    library_name: timm | peft           the library that loads the folder
    pipeline_tag: image-classification
    tags: [image-classification, adaptune, <method>, timm | peft]
    base_model: timm/<model>.<tag>      only for hub weights (backbone.pretrained: true, or an hf-hub: model)
    base_model_relation: finetune | adapter
    datasets: [<data.<source>.hub_id>]  only where the recipe names a Hub data set
    model-index: [...]                  the validation / test top-1 of the exported weights, where known
    # license: not set ...              a comment: the licence is the publisher's choice (the base's is named)
    ---
    # <method> on <backbone>
    what was trained, how to load it, the input, the data, the evaluation table, the training settings

`render` is a pure function of the export manifest (`adaptune.export`) and the evaluation (`run_evaluation`: the
numbers of the exported weights from the run's ``summary.json`` and ``metrics.jsonl``). Local paths in data options
are cut to their last component (the card is meant to be public). Snippets name the repository ``USER/REPO``;
``adaptune push`` writes the real id into the uploaded copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from adaptune.batch import InputSpec
    from adaptune.recipe import Recipe

REPO_PLACEHOLDER = "USER/REPO"
CARD_FILE = "README.md"
LIBRARIES = {"timm": "timm", "peft": "peft"}  # export format -> the Hub's library_name
MAX_CLASS_NAMES = 30  # classes listed in the card; the export's config / manifest holds all


def base_model(backbone: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Hub id of the base weights, their licence) for a manifest's ``backbone`` section; (None, None) when the
    weights are random or local, or timm names no Hub repository for them."""
    model = str(backbone.get("model", ""))
    if backbone.get("pretrained") is not True:
        return None, None
    if model.startswith("hf-hub:"):
        return model.removeprefix("hf-hub:").split("@")[0], None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
    except Exception:  # an unknown name or tag: timm raises RuntimeError, older versions others
        return None, None
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "license", None) or None


def eval_resize(recipe: Recipe, spec: InputSpec) -> tuple[int, int]:
    """The (H, W) images are resized to before the centre crop to ``spec.size`` at evaluation (equal: no crop)."""
    from adaptune.data.augment import stored_size

    return stored_size(recipe.data.augment, spec.size)


def crop_pct(size: tuple[int, int], resize: tuple[int, int]) -> float:
    """timm's ``crop_pct`` for the centre crop of ``size`` from ``resize`` (both (H, W)): timm's evaluation transform
    resizes to ``floor(size / crop_pct)``, so the ratio is lowered by a few ulps where rounding would land one pixel
    short."""
    pct = size[-1] / resize[-1]
    while math.floor(size[-1] / pct) < resize[-1]:
        pct = math.nextafter(pct, 0.0)
    return pct


def run_evaluation(source: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation of the weights being exported: from ``summary.json`` (and the last ``metrics.jsonl`` record)
    when ``source`` is a finished run directory, else the ``evaluation`` a source manifest carries, else None.

    Returns:
        ``{"weights": "best"|"last", "epoch", "epochs", "steps", "ema", "val_split", "val_top1", "test_split",
        "test_top1"}`` (top-1 in %; None where not measured).
    """
    from adaptune import artifacts

    if not artifacts.is_run_dir(source):
        carried = manifest.get("evaluation")
        return carried if isinstance(carried, dict) else None
    try:
        summary = json.loads((source / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # an unfinished run: no numbers to show
    if not isinstance(summary, dict):
        return None
    checkpoint = manifest.get("checkpoint", "best")
    final = summary.get("final_weights", "last")
    weights = "last" if checkpoint == "last" else final
    recipe = manifest.get("recipe") or {}
    data = recipe.get("data", {}) if isinstance(recipe, dict) else {}
    epochs = summary.get("epochs")
    if weights == "best":
        epoch, val = summary.get("best_val_epoch"), summary.get("best_val_top1")
    else:
        epoch, val = epochs, _last_val_top1(source / "metrics.jsonl", epochs)
    return {
        "weights": weights,
        "epoch": epoch,
        "epochs": epochs,
        "steps": summary.get("steps"),
        "ema": bool(summary.get("ema_weights")),
        "val_split": data.get("val_split"),
        "val_top1": val,
        "test_split": data.get("test_split"),
        "test_top1": summary.get(f"test_top1_{weights}"),
    }


def _last_val_top1(metrics: Path, epoch: Any) -> float | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch") == epoch and "val_top1" in record:
            return record["val_top1"]
    return None


# ----------------------------------------------------------------------------------------------------------------
# the card


def render(
    manifest: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    *,
    method_summary: str | None = None,
    resize: tuple[int, int] | None = None,
) -> str:
    """The ``README.md`` of an export.

    Args:
        manifest: The export manifest (``format`` ``timm`` or ``peft``, ``method``, ``backbone``, ``input``,
            ``recipe``, ``class_names``, ``trainable_parameters``).
        evaluation: As `run_evaluation` returns; default: ``manifest["evaluation"]``.
        method_summary: The method's one-line description (its `MethodSpec.summary`).
        resize: The evaluation resize before the centre crop (`eval_resize`); default: the input size (no crop).

    Returns:
        The card: YAML front matter, then Markdown.
    """
    if evaluation is None:
        evaluation = manifest.get("evaluation") if isinstance(manifest.get("evaluation"), dict) else None
    card = _Card(manifest, evaluation, method_summary, resize)
    return card.front_matter() + "\n" + card.body()


class _Card:
    """The pieces of one card, read from the manifest once."""

    def __init__(self, manifest: dict[str, Any], evaluation: dict[str, Any] | None, summary: str | None, resize: Any):
        self.m = manifest
        self.fmt = str(manifest.get("format", "timm"))
        self.library = LIBRARIES.get(self.fmt, self.fmt)
        method = manifest.get("method") or {}
        self.method = str(method.get("name", manifest.get("adapter_type", "adapter")))
        self.options = {k: v for k, v in method.items() if k != "name"}
        self.backbone = manifest.get("backbone") or {}
        self.model = str(self.backbone.get("model", "?"))
        self.base, self.base_license = base_model(self.backbone)
        recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
        self.recipe = recipe
        self.data = recipe.get("data") or {}
        self.source = str(self.data.get("source", "?"))
        source_options = self.data.get(self.source)
        self.data_options = source_options if isinstance(source_options, dict) else {}
        self.hub_dataset = self.data_options.get("hub_id") if isinstance(self.data_options.get("hub_id"), str) else None
        self.eval = evaluation
        self.summary = summary
        spec = manifest.get("input") or {}
        self.shape = tuple(int(v) for v in spec.get("shape", (3, 224, 224)))
        self.mean = [round(float(v), 4) for v in spec.get("mean", ())]
        self.std = [round(float(v), 4) for v in spec.get("std", ())]
        self.interpolation = str(spec.get("interpolation", "bicubic"))
        self.resize = tuple(resize) if resize else self.shape[-2:]
        self.classes = [str(c) for c in manifest.get("class_names") or []]

    # -- metadata ---------------------------------------------------------------------------------------------

    def front_matter(self) -> str:
        meta: dict[str, Any] = {
            "library_name": self.library,
            "pipeline_tag": "image-classification",
            "tags": list(dict.fromkeys(["image-classification", "adaptune", self.method, self.library, "timm"])),
        }
        if self.base:
            meta["base_model"] = self.base
            meta["base_model_relation"] = "adapter" if self.fmt == "peft" else "finetune"
        if self.hub_dataset:
            meta["datasets"] = [self.hub_dataset]
        results = self._model_index_results()
        if results:
            meta["model-index"] = [{"name": f"{self.method}-{self.model}", "results": results}]
        base = f" (the base weights are {self.base_license} per timm)" if self.base_license else ""
        licence = f"# license: not set by adaptune; add the licence you publish under{base}\n"
        return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + licence + "---\n"

    def _model_index_results(self) -> list[dict[str, Any]]:
        if not self.eval:
            return []
        dataset = self.hub_dataset or self.source
        out = []
        for role in ("test", "val"):
            value, split = self.eval.get(f"{role}_top1"), self.eval.get(f"{role}_split")
            if value is None or split is None:
                continue
            out.append(
                {
                    "task": {"type": "image-classification", "name": "Image Classification"},
                    "dataset": {"name": self._dataset_name(), "type": dataset, "split": str(split)},
                    "metrics": [{"type": "accuracy", "value": round(float(value), 2), "name": "top-1 accuracy (%)"}],
                }
            )
        return out

    def _dataset_name(self) -> str:
        """The data set in a few words: the Hub id, else the source and its text options (names, tasks, files)."""
        if self.hub_dataset:
            return self.hub_dataset
        text = {k: v for k, v in self.data_options.items() if isinstance(v, str) and v}
        shown = _inline_short(text).replace("`", "")
        return f"{self.source} ({shown})" if shown else self.source

    # -- body -------------------------------------------------------------------------------------------------

    def body(self) -> str:
        parts = [
            f"# {self.method} on {self.model}\n",
            self._intro(),
            "## How to use\n",
            self._usage(),
            "## Input\n",
            self._input(),
            "## Training data\n",
            self._data_section(),
            "## Evaluation\n",
            self._evaluation(),
            "## Training\n",
            self._training(),
        ]
        return "\n".join(parts)

    def _intro(self) -> str:
        what = (
            "a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) and the new classifier head"
            if self.fmt == "peft"
            else "plain timm weights (`config.json` + `model.safetensors`): the adapter is folded into the backbone"
        )
        trainable = self.m.get("trainable_parameters")
        lines = [
            f"An image classifier trained with adaptune: `{self.method}` on the frozen timm backbone `{self.model}`, "
            f"{len(self.classes)} classes. This folder holds {what}.\n",
            f"- **Method**: `{self.method}`" + (f": {self.summary}" if self.summary else ""),
            f"- **Method options**: {_inline(self.options) or 'defaults'}",
            f"- **Trainable parameters**: {trainable:,}" if isinstance(trainable, int) else None,
            f"- **Base model**: {self._base_line()}",
            f"- **Made with**: adaptune {self.m.get('adaptune_version', '?')}, timm {self.m.get('timm_version', '?')}",
        ]
        return "\n".join(line for line in lines if line is not None) + "\n"

    def _base_line(self) -> str:
        pretrained = self.backbone.get("pretrained")
        if self.base:
            return f"[`{self.base}`](https://huggingface.co/{self.base})"
        if pretrained is False:
            return f"`{self.model}` with random weights (backbone.pretrained: false; seed {self._seed()})"
        if isinstance(pretrained, str):
            return f"`{self.model}` with weights from `{_short(pretrained)}` (not on the Hub)"
        return f"`{self.model}` (timm names no Hub repository for its weights)"

    def _seed(self) -> int:
        return int((self.recipe.get("train") or {}).get("seed", 0))

    def _usage(self) -> str:
        return self._usage_peft() if self.fmt == "peft" else self._usage_timm()

    def _usage_timm(self) -> str:
        return (
            "```python\n"
            "import timm\n"
            "import torch\n"
            "from PIL import Image\n\n"
            f'model = timm.create_model("hf-hub:{REPO_PLACEHOLDER}", pretrained=True).eval()\n'
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
            'image = Image.open("image.jpg").convert("RGB")\n'
            "with torch.inference_mode():\n"
            "    probs = model(transform(image).unsqueeze(0)).softmax(-1)  # (1, classes)\n"
            'print(model.pretrained_cfg["label_names"][probs.argmax().item()])\n'
            "```\n\n"
            f'A local copy loads the same way with `timm.create_model("local-dir:PATH", pretrained=True)`; adaptune '
            "reads it too (`adaptune eval PATH`).\n"
        )

    def _usage_peft(self) -> str:
        kwargs = {"num_classes": len(self.classes)}
        if self.backbone.get("img_size") is not None:
            kwargs["img_size"] = self.backbone["img_size"]
        kwargs.update(self.backbone.get("model_kwargs") or {})
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        source = self.backbone.get("pretrained")
        pretrained = source is True
        seed = f"torch.manual_seed({self._seed()})  # the random backbone weights it was trained on\n"
        seed = seed if source is False else ""
        weights = "  # then load your local base weights into it" if isinstance(source, str) else ""
        return (
            "```python\n"
            "import timm\n"
            "import torch\n"
            "from peft import PeftModel\n"
            "from PIL import Image\n\n"
            f"{seed}"
            f'base = timm.create_model("{self.model}", pretrained={pretrained}{args}){weights}\n'
            f'model = PeftModel.from_pretrained(base, "{REPO_PLACEHOLDER}").eval()\n'
            f"transform = {self._transform_call()}\n"
            'image = Image.open("image.jpg").convert("RGB")\n'
            "with torch.inference_mode():\n"
            "    probs = model(transform(image).unsqueeze(0)).softmax(-1)  # (1, classes)\n"
            "```\n\n"
            "PEFT replaces the classifier head with the trained one (`modules_to_save`); the class names are in "
            "the adaptune manifest of `adapter_model.safetensors` (metadata key `adaptune`).\n"
        )

    def _transform_call(self) -> str:
        c, h, w = self.shape
        return (
            f'timm.data.create_transform(input_size=({c}, {h}, {w}), crop_pct={self._crop_pct()}, crop_mode="squash", '
            f'interpolation="{self.interpolation}", mean={tuple(self.mean)!r}, std={tuple(self.std)!r})'
        )

    def _crop_pct(self) -> float:
        return crop_pct(self.shape[-2:], self.resize)

    def _input(self) -> str:
        c, h, w = self.shape
        rh, rw = self.resize
        crop = "" if (rh, rw) == (h, w) else f", then the centre {h}x{w} crop"
        return (
            f"RGB images resized to {rh}x{rw} ({self.interpolation}, the aspect ratio is not kept){crop}, scaled to "
            f"[0, 1] and normalised with mean {self.mean} and std {self.std}; {c} channel(s). timm's "
            f'`create_transform` with `crop_mode="squash"` and `crop_pct={self._crop_pct()}` does the same.\n'
        )

    def _data_section(self) -> str:
        lines = [
            f"- **Source**: `{self.source}`" + (f": {_inline_short(self.data_options)}" if self.data_options else "")
        ]
        if self.hub_dataset:
            lines.append(
                f"- **Hub data set**: [`{self.hub_dataset}`](https://huggingface.co/datasets/{self.hub_dataset})"
            )
        splits = {k: self.data.get(f"{k}_split") for k in ("train", "val", "test")}
        lines.append("- **Splits**: " + ", ".join(f"{k} `{v}`" for k, v in splits.items() if v is not None))
        shown = ", ".join(f"`{c}`" for c in self.classes[:MAX_CLASS_NAMES])
        more = f" and {len(self.classes) - MAX_CLASS_NAMES} more" if len(self.classes) > MAX_CLASS_NAMES else ""
        lines.append(f"- **Classes** ({len(self.classes)}): {shown}{more}")
        return "\n".join(lines) + "\n"

    def _evaluation(self) -> str:
        if not self.eval:
            return "Not recorded with this export (exported from a file without a run summary).\n"
        e = self.eval
        weights = f"{e.get('weights')} weights" + (f" (epoch {e['epoch']})" if e.get("epoch") is not None else "")
        if e.get("ema"):
            weights += ", EMA"
        rows = ["| split | weights | top-1 accuracy (%) |", "|---|---|---|"]
        for role in ("val", "test"):
            split, value = e.get(f"{role}_split"), e.get(f"{role}_top1")
            if split is not None:
                shown = f"{float(value):.2f}" if value is not None else "not measured"
                rows.append(f"| {role} (`{split}`) | {weights} | {shown} |")
        if len(rows) == 2:
            return "The run had no validation or test split.\n"
        trained = f"{_count(e.get('epochs'), 'epoch')}, {_count(e.get('steps'), 'optimizer step')}"
        return "\n".join(rows) + f"\n\nTrained for {trained}; measured by adaptune on the data above.\n"

    def _training(self) -> str:
        train = self.recipe.get("train") or {}
        keys = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs", "precision")
        shown = {k: train[k] for k in keys if k in train}
        return (
            f"{_inline(shown)}.\n\nThe full resolved recipe is in the `adaptune` metadata of the safetensors file "
            f"(`{self.recipe.get('name', 'run')}`).\n"
        )


def _short(value: Any) -> str:
    """A value for a public card: a path-like string cut to its last component."""
    if isinstance(value, str) and ("/" in value or "\\" in value) and not value.startswith(("hf-hub:", "http")):
        return ".../" + value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return str(value)


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _inline(options: dict[str, Any]) -> str:
    return ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in options.items())


def _inline_short(options: dict[str, Any]) -> str:
    """Data options for the card; ``hub_id`` is a Hub id, never a path."""
    shown = {k: v if k == "hub_id" else _short(v) for k, v in options.items() if v not in (None, [], {}, "")}
    return ", ".join(f"`{k}: {v}`" for k, v in shown.items())
