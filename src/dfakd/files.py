"""Reading and writing the files dfakd owns: one atomic writer, one YAML reader, one JSON reader, one safe
checkpoint loader. The ground floor of the package: it imports nothing of dfakd but its error type.

- Writes are atomic (temporary name in the same folder, fsync, rename), so a file that exists is complete,
  and follow the user's umask (0644 under the usual 022), checkpoints included.
- Reads are strict: a file must be UTF-8, a mapping must not repeat a key (YAML and JSON alike would
  silently keep the last one), JSON must not hold NaN/Infinity; every failure is one :class:`DfakdError`
  line naming the file.
- Checkpoints load with ``torch.load(weights_only=True)`` only: pickled Python objects are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from dfakd.errors import DfakdError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in ``parent`` to write into before renaming it into place, with the mode the umask
    gives a new folder (``mkdtemp`` makes 0700, which a renamed dataset folder would keep)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def _atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a results file is meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    import torch

    _atomic(Path(path), lambda f: torch.save(obj, f))


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; a missing file or another encoding is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DfakdError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DfakdError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line})"
        ) from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly (duplicate keys refused); errors name ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise DfakdError(f"malformed YAML in {source}{where}: {problem}") from None
    except RecursionError:
        raise DfakdError(f"malformed YAML in {source}: nested too deeply") from None


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    return parse_yaml(read_text(path, what), str(path))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str, source: str) -> Any:
    """Parse JSON strictly (duplicate keys and NaN/Infinity refused); errors name ``source``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise DfakdError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:
        raise DfakdError(f"{source} is not valid JSON ({exc})") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_mapping(path: str | Path, what: str, reader: Callable[[str | Path, str], Any]) -> dict[str, Any]:
    """A YAML/JSON file that must hold a mapping at top level."""
    doc = reader(path, what)
    if not isinstance(doc, dict):
        raise DfakdError(f"{what} {path} must hold a mapping at top level, got {type(doc).__name__}")
    return doc


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line :class:`DfakdError`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DfakdError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise DfakdError(
                f"checkpoint {path} contains pickled Python objects ({found.group(1)}), refused (only "
                "tensors and plain containers are loaded, weights_only=True)"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
        raise DfakdError(f"checkpoint {path} is truncated or corrupt: {first}") from None


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """An output file path must not be a folder and its folder must be creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise DfakdError(f"{what} {path} is a folder; name a file")
    _check_writable_parent(path.parent, what, path)
    return path


def check_output_dir(path: str | Path, what: str = "run folder") -> Path:
    """A run folder must not be an existing file and must be creatable and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DfakdError(f"{what} {path} is an existing file, not a folder")
    if path.is_dir():
        _probe(path, what, path)
        return path
    _check_writable_parent(path.parent, what, path)
    return path


def _check_writable_parent(parent: Path, what: str, path: Path) -> None:
    existing = parent
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise DfakdError(f"{what} {path}: {existing} is a file, not a folder")
    _probe(existing, what, path)


def _probe(folder: Path, what: str, path: Path) -> None:
    """Try to create (and at once remove) a file: permission bits alone do not say it for root, a
    read-only file system or a full disk."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DfakdError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None
