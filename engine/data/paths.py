"""Where datasets live: an explicit path, else $ENGINE_DATA, else ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MissingFileError

ENV_VAR = "ENGINE_DATA"


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The data directory to read from.

    Args:
        path: an explicit directory (a CLI flag); wins over everything else.

    Returns:
        ``path``, else ``$ENGINE_DATA``, else the first ``../shared/data`` found
        from the working directory upwards (it need not exist; loaders say what is missing).
    """
    if path is not None:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path("../shared/data")


def require_files(folder: Path, names: list[str], what: str) -> None:
    """Raise FileNotFoundError naming every expected file that is missing."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise MissingFileError(
            f"{what} not found in {folder}: missing {', '.join(missing)}. "
            f"Pass the data directory (--data or ${ENV_VAR}); it should hold {', '.join(names)}."
        )
