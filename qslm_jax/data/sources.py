"""Where data comes from: a local data directory or the Hugging Face hub, and the one error when neither
works.

Resolution order for every loader: the ``data_dir=`` argument, else the ``QSLM_DATA_DIR`` environment variable
(both: a directory with the layout of ``shared/data``, see its PROVENANCE.md), else the hub. A local directory
that lacks the file is an error at once (no silent fallback to the network); a hub failure (offline, no
network, no cache) is reported as the same :class:`DataError`, naming both ways to provide the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from qslm_jax.errors import DataError

DATA_DIR_ENV = "QSLM_DATA_DIR"
T = TypeVar("T")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data directory to use: ``data_dir`` if given, else ``$QSLM_DATA_DIR``, else None (use the
    hub), as an absolute path with symlinks resolved, so every spelling of one directory names the same source
    (search journals fingerprint the source, see ``qslm.journal``)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).resolve() if chosen else None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks the HF libraries not to touch the
    network."""
    return any(os.environ.get(var, "0").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def missing_data_error(what: str, relative_path: str, hub_name: str, *, local: Path | None,
                       cause: BaseException | None = None) -> DataError:
    """The one error for data that could not be found, naming both ways to provide it.

    ``relative_path`` is the file expected under the data directory; ``hub_name`` the hub identifier tried.
    """
    if local is not None:
        found = f"the local data directory {local} has no {relative_path}"
    elif hub_offline():
        found = (f"no local data directory is set and the hub is offline "
                 f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) with no cached copy of {hub_name}")
    else:
        found = f"no local data directory is set and the hub could not provide {hub_name}"
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return DataError(
        f"{what} is not available: {found}{detail}. Provide it either by (1) pointing {DATA_DIR_ENV} "
        f"(or data_dir= / --data-dir) at a directory holding {relative_path} (the layout of shared/data, "
        f"see its PROVENANCE.md), or (2) running with Hugging Face hub access to {hub_name}."
    )


def local_file(root: Path, relative_path: str, what: str, hub_name: str) -> Path:
    """``root / relative_path`` if it is a file, else the missing-data :class:`DataError`."""
    path = root / relative_path
    if not path.is_file():
        raise missing_data_error(what, relative_path, hub_name, local=root)
    return path


def from_hub(fetch: Callable[[], T], what: str, relative_path: str, hub_name: str) -> T:
    """Run ``fetch()`` (a hub download/load); any failure becomes the missing-data :class:`DataError`."""
    try:
        return fetch()
    except (OSError, ValueError, ImportError, RuntimeError) as err:  # ConnectionError is an OSError
        raise missing_data_error(what, relative_path, hub_name, local=None, cause=err) from err


def hub_file(repo_id: str, filename: str) -> Path:
    """Download one file of a hub model repo with ``huggingface_hub`` (cache only when offline)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, local_files_only=hub_offline(), etag_timeout=5))
