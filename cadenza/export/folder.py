"""The output folder of an export: written aside and renamed into place (cadenza.artifacts.atomic_dir), so a failed
export leaves no half-written output. An existing folder is replaced only when it is empty or holds an earlier
export (its EXPORT_INFO file): a folder of the user's is never deleted."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

from .. import __version__
from ..artifacts import atomic_dir, write_json
from ..errors import CadenzaError

EXPORT_INFO = "cadenza_export.json"


@contextlib.contextmanager
def export_folder(output_path: Union[str, Path]) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `output_path` when the block finishes without error."""
    out = Path(output_path).expanduser()
    _check_replaceable(out)
    with atomic_dir(out) as tmp:
        yield tmp


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CadenzaError(f"output path {out} is a file; give a folder path (it is created)")
    if any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        raise CadenzaError(f"output path {out} is a folder with other files in it, and an export replaces the whole "
                           "folder: give a new or empty folder (an earlier export's folder is replaced)")


def write_export_info(folder: Path, model_dir: Path, format: str, **details) -> None:
    """What was exported from where, with which Cadenza, and what the export's check measured."""
    write_json(folder / EXPORT_INFO, {"format": format, "source": str(Path(model_dir).resolve()),
                                      "cadenza_version": __version__, **details})
