"""Publishing an export on the Hugging Face Hub: the engine of ``adaptune push EXPORT_DIR REPO_ID``.

Only a folder that ``adaptune export --format timm`` or ``--format peft`` wrote is published: its weights file
(``model.safetensors`` / ``adapter_model.safetensors``) carries an adaptune manifest whose ``format`` says so. A run
directory is refused (PEFT and timm cannot read it: export it first). What goes up is every file of the folder but
hidden ones (`plan_upload`, the ``--dry-run``), in one commit, with ``USER/REPO`` in the model card replaced by the
repository's id. Needs the optional ``huggingface_hub`` (``pip install 'adaptune[hub]'``), imported only here.

The token is ``token``, else huggingface_hub's own (``HF_TOKEN``, or ``hf auth login``); without one nothing is sent.
Failures become one line that says what to do: offline mode (``HF_HUB_OFFLINE``), a refused token (401), no write
access (403), a network that does not reach the Hub.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adaptune.errors import ArtifactError

INSTALL = "adaptune push needs huggingface_hub; run: pip install 'adaptune[hub]'"
WEIGHTS = {"timm": "model.safetensors", "peft": "adapter_model.safetensors"}  # export format -> its weights file
CARD = "README.md"  # `adaptune.exporters.model_card.CARD_FILE`
MAX_HEADER = 100 << 20  # a larger safetensors header is a damaged file
LOGIN = "set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or run `hf auth login`"


class HubError(ArtifactError):
    """The Hub or the network failed, not the input (exit 1: the same command may work later)."""

    exit_code = 1


def _manifest(weights: Path) -> dict[str, Any] | None:
    """The adaptune manifest in a safetensors file's header, read without loading the tensors (None: none)."""
    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
        raw = (header.get("__metadata__") or {}).get("adaptune")
        manifest = json.loads(raw) if raw else None
    except (OSError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{weights}: not a readable safetensors file ({e}); re-create the export") from None
    return manifest if isinstance(manifest, dict) else None


def export_format(export_dir: str | Path) -> str:
    """``timm`` or ``peft``: what the adaptune export in ``export_dir`` is.

    Raises:
        ArtifactError: No such folder, a run directory, or no adaptune timm/PEFT export (with the command to make one).
    """
    from adaptune import artifacts

    folder = Path(export_dir)
    make = f"adaptune export RUN_DIR --format timm --out {folder} (or --format peft)"
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such directory; create the export first: {make}")
    if artifacts.is_run_dir(folder):
        raise ArtifactError(
            f"{folder}: a run directory, which timm and PEFT cannot load; export it first: "
            f"adaptune export {folder} --format timm --out EXPORT_DIR (or --format peft), then push EXPORT_DIR"
        )
    for fmt, weights in WEIGHTS.items():
        if (folder / weights).is_file():
            manifest = _manifest(folder / weights)
            if manifest is not None and manifest.get("format") == fmt:
                artifacts.check_format_version(manifest, folder / weights)
                return fmt
    raise ArtifactError(
        f"{folder}: not an adaptune timm or PEFT export (no {' or '.join(WEIGHTS.values())} with an adaptune "
        f"manifest of that format); create one: {make}"
    )


def plan_upload(export_dir: str | Path) -> dict[str, Any]:
    """What `push` would upload, without contacting the Hub (``adaptune push --dry-run``).

    Returns:
        ``{"export_dir", "format": "timm"|"peft", "files": [{"path", "bytes"}], "total_bytes", "warnings"}``: every
        regular file under the folder, relative POSIX paths, sorted; hidden files and folders (``.git``, locks,
        temporary files) are left out.

    Raises:
        ArtifactError: As `export_format`.
    """
    folder = Path(export_dir)
    fmt = export_format(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
            continue
        files.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
    warnings = []
    if not (folder / CARD).is_file():
        warnings.append(f"no {CARD} (model card): the Hub page will be empty; export again with this adaptune")
    return {
        "export_dir": str(folder),
        "format": fmt,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "warnings": warnings,
    }


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ArtifactError(INSTALL) from None
    return huggingface_hub


@contextlib.contextmanager
def hub_errors(hub: Any, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's offline, HTTP and network exceptions into one-line errors that say what to do."""
    errors = hub.errors
    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise HubError(
            "the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set), so nothing was uploaded; unset "
            "HF_HUB_OFFLINE on a machine that reaches the network and run adaptune push again"
        ) from None
    except errors.LocalTokenNotFoundError:
        raise ArtifactError(f"no Hugging Face token; {LOGIN}") from None
    except getattr(errors, "OIDCError", ()) as e:  # HF_OIDC_RESOURCE set (trusted publishing) and the exchange failed
        raise ArtifactError(
            f"HF_OIDC_RESOURCE is set but the OIDC token exchange failed ({str(e).splitlines()[0][:160]}); fix the "
            f"trusted-publisher set-up, or unset HF_OIDC_RESOURCE and {LOGIN}"
        ) from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        if status == 401:
            raise ArtifactError(f"the Hub refused the token (401 Unauthorized); {LOGIN}") from None
        if status == 403:
            raise ArtifactError(
                f"the token may not write to {namespace!r} (403 Forbidden); use a token with write access to it, or "
                "push to your own namespace"
            ) from None
        if status == 404:
            raise ArtifactError(f"repository {repo_id!r} not found for this token (404); check REPO_ID") from None
        raise HubError(
            f"the Hub answered {status or 'with an error'} ({first}); try adaptune push again later"
        ) from None
    except (errors.HTTPError, OSError) as e:  # transport failures: DNS, refused connection, timeouts, TLS
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise HubError(
            f"cannot reach the Hugging Face Hub ({type(e).__name__}: {detail}); check the network (and HF_ENDPOINT) "
            "and run adaptune push again"
        ) from None


def check_repo_id(hub: Any, repo_id: str) -> None:
    """Raise `ArtifactError` unless ``repo_id`` is a valid ``NAME`` or ``NAMESPACE/NAME``."""
    try:
        hub.utils.validate_repo_id(repo_id)
    except hub.errors.HFValidationError as e:
        raise ArtifactError(
            f"REPO_ID: {repo_id!r} is not a Hub repository id ({str(e).splitlines()[0][:160]}); use NAME or USER/NAME"
        ) from None
    if repo_id.count("/") > 1:
        raise ArtifactError(f"REPO_ID: {repo_id!r} has more than one '/'; use NAME or USER/NAME")


def commit_files(export_dir: str | Path, plan: dict[str, Any], repo_id: str) -> list[tuple[str, Path | bytes]]:
    """(path in the repository, content) of each planned file: the model card's ``USER/REPO`` becomes ``repo_id``."""
    from adaptune.exporters.model_card import REPO_PLACEHOLDER

    folder = Path(export_dir)
    out: list[tuple[str, Path | bytes]] = []
    for entry in plan["files"]:
        path = folder / entry["path"]
        if entry["path"] == CARD:
            out.append((entry["path"], path.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id).encode()))
        else:
            out.append((entry["path"], path))
    return out


def push(export_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> dict[str, Any]:
    """Upload an adaptune timm or PEFT export to the Hugging Face Hub, creating the model repository if needed.

    Args:
        export_dir: A folder written by ``adaptune export --format timm`` or ``--format peft``.
        repo_id: ``NAME`` (the token owner's namespace) or ``NAMESPACE/NAME``.
        private: Create the repository private (an existing repository keeps its visibility).
        token: A Hub token; default: huggingface_hub's (``HF_TOKEN`` or ``hf auth login``).

    Returns:
        ``{"repo_id", "url", "commit", "commit_url", "format", "files", "total_bytes", "private", "warnings"}``.

    Raises:
        ArtifactError: Not an export, huggingface_hub missing, a bad repo id, no or a refused token, no write access.
        HubError: Offline mode, the network or the Hub failed.
    """
    plan = plan_upload(export_dir)
    hub = _hub()
    check_repo_id(hub, repo_id)
    with hub_errors(hub, repo_id):
        token = token or hub.get_token()
        if not token:
            raise ArtifactError(f"no Hugging Face token; {LOGIN}")
        api = hub.HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        full_id = getattr(url, "repo_id", None) or repo_id
        operations = [
            hub.CommitOperationAdd(path_in_repo=path, path_or_fileobj=content)
            for path, content in commit_files(export_dir, plan, full_id)
        ]
        info = api.create_commit(
            repo_id=full_id,
            operations=operations,
            commit_message=f"Upload adaptune {plan['format']} export",
            repo_type="model",
        )
    return {
        "repo_id": full_id,
        "url": str(url),
        "commit": getattr(info, "oid", None),
        "commit_url": getattr(info, "commit_url", None),
        "format": plan["format"],
        "files": plan["files"],
        "total_bytes": plan["total_bytes"],
        "private": private,
        "warnings": plan["warnings"],
    }


def format_plan(plan: dict[str, Any], repo_id: str | None = None) -> str:
    """The lines ``adaptune push --dry-run`` prints."""
    where = f" to {repo_id}" if repo_id else ""
    lines = [f"would upload {len(plan['files'])} files ({_size(plan['total_bytes'])}, {plan['format']} export){where}:"]
    lines += [f"  {f['path']:<40} {_size(f['bytes']):>10}" for f in plan["files"]]
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def format_push_report(report: dict[str, Any]) -> str:
    """The lines ``adaptune push`` prints."""
    lines = [
        f"pushed {len(report['files'])} files ({_size(report['total_bytes'])}, {report['format']} export) to "
        f"{report['url']}",
    ]
    if report.get("commit_url"):
        lines.append(f"  commit     {report['commit_url']}")
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"
