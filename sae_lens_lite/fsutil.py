"""Small file-system helpers shared by every stage: nothing half-written may look complete."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from sae_lens_lite.errors import UserError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary name, then rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib figure laid out, written to a temporary name, renamed into place and closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file to a temporary name, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    mode_from_umask(tmp)
    os.replace(tmp, path)


def mode_from_umask(path: str | os.PathLike) -> None:
    """safetensors creates its files mode 0600; give them the mode every other file gets
    (0666 less the umask), so whoever may read a run's JSON may read its weights too."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux says it without changing it
        found = re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M)
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere, set and restore
    os.umask(old)
    return old


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def prepare_out_dir(path: str | os.PathLike, overwrite: bool, marker: str, debris: tuple[str, ...] = ()) -> Path:
    """Create an output directory, refusing one that holds other work unless `overwrite`.

    `marker` is the file that identifies our own output of this kind (for example
    config.json of an SAE); a directory holding only that kind of output may be resumed into.
    `debris`: glob patterns of files the stage writes before its marker (a run killed that
    early left them); a directory holding nothing else is ours too.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory: choose another --out")
    ours = lambda p: any(p.match(pat) for pat in debris)  # noqa: E731
    if path.exists() and not overwrite and not (path / marker).exists() and not all(ours(p) for p in path.iterdir()):
        raise UserError(f"{path} is not empty and holds other work: choose another --out or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    return path


def claim_out_dir(path: str | os.PathLike, overwrite: bool, report: str, ours: tuple[str, ...], what: str) -> Path:
    """An output directory for a report-writing command (evaluate, compare): refused while it
    holds a finished `report` or files that are not ours (`ours`, and *.tmp), unless `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory: choose another --out")
    if (path / report).exists() and not overwrite:
        raise UserError(f"{path} already holds {what}; pass --overwrite to replace it or choose another --out")
    if (
        path.exists()
        and not overwrite
        and any(p.name not in ours and not p.name.endswith(".tmp") for p in path.iterdir())
    ):
        raise UserError(f"{path} is not empty and holds other work: choose another --out or pass --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    return path
