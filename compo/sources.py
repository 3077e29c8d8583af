"""Preference rows from Hugging Face ``datasets``: a ``save_to_disk`` directory or a hub id.

``data.path`` names a local file (read by :mod:`compo.readers`), a directory written by
``datasets.save_to_disk`` (read with ``datasets.load_from_disk``: a ``Dataset``, or a
``DatasetDict`` whose ``data.split`` is taken) or a dataset id on the Hugging Face hub (read with
``datasets.load_dataset(id, split=data.split)``, only for a name that cannot be a local path;
``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` are honoured, and then only the local cache
answers). Either way the rows come back one by one, numbered from 1, for the same per-row
validation as a file's rows: nothing is dropped or retyped here.

Failures a user can cause (an unreachable or offline hub, an unknown id or split, a directory
that holds no dataset) are one :class:`compo.errors.DataError` line naming ``data.path``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compo.errors import DataError, first_line

log = logging.getLogger(__name__)

# What save_to_disk writes: state.json for a Dataset, dataset_dict.json for a DatasetDict.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
# owner/name or name, as the hub spells ids: no leading dot, slash or tilde, at most one slash.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# A file extension (".jsonl", ".parquet", a typo such as ".jsnol"): a letter first, so the ".1"
# of a versioned id ("owner/set-v0.1") is not one.
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,7}")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets.save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` could be a hub dataset id (``owner/name`` or ``name``) and not a local path.

    A local path is never sent to the hub (a typo there would cost half a minute of retries
    before its one-line error): one that exists, whose first component exists here (``d/typo``
    with a folder ``d``), that starts with ``.``, ``/`` or ``~``, or that has a file extension.
    """
    path = Path(text)
    return (
        _HUB_ID.fullmatch(text) is not None
        and _EXTENSION.fullmatch(path.suffix) is None
        and not path.exists()
        and not Path(path.parts[0]).exists()
    )


def _rows(dataset: Any) -> Iterator[tuple[int, Any]]:
    # One row at a time, as plain Python values (the Arrow table is memory-mapped, not copied).
    yield from enumerate(dataset, start=1)


def _pick_split(found: Any, split: str, where: str) -> Any:
    """The ``split`` of a DatasetDict (a Dataset is returned as it is)."""
    import datasets

    if not isinstance(found, datasets.DatasetDict):
        return found
    if split not in found:
        raise DataError(f"{where}: no split {split!r} (data.split); it has {sorted(found)}")
    return found[split]


def read_saved(path: Path, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Rows of a ``save_to_disk`` directory, and the label errors name it by.

    Args:
        path: The directory.
        split: The split to read when it holds a ``DatasetDict``.

    Raises:
        DataError: The directory cannot be read as a dataset, or has no such split.
    """
    import datasets

    try:
        found = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # an incomplete or foreign directory
        raise DataError(
            f"data.path={path}: not a dataset written by save_to_disk: {first_line(exc)}"
        ) from None
    dataset = _pick_split(found, split, f"data.path={path}")
    label = f"{path}[{split}]" if isinstance(found, datasets.DatasetDict) else str(path)
    return label, _rows(dataset)


def read_hub(name: str, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """Rows of the hub dataset ``name`` at ``split``, and the label errors name it by.

    Raises:
        DataError: The hub is unreachable or offline without a cached copy, the id or the split
            does not exist, or ``datasets`` cannot build the dataset.
    """
    import datasets

    log.info("data.path=%r is no local path; loading it from the Hugging Face hub", name)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    # Its retries warn once per attempt (11 lines, ~23 s without a network); the error below
    # says what failed.
    hub_log.setLevel(logging.ERROR)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, offline mode, auth, unknown id or split, builder errors
        reason = first_line(exc)
        offline = "offline" in reason.lower() or datasets.config.HF_DATASETS_OFFLINE
        hint = " (offline: only datasets in the local cache load)" if offline else ""
        raise DataError(
            f"data.path={name!r}: no such local file or directory, and the Hugging Face hub "
            f"could not load it as a dataset id{hint}: {type(exc).__name__}: {reason}"
        ) from None
    finally:
        hub_log.setLevel(level)
    return f"{name}[{split}]", _rows(dataset)
