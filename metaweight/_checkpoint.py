"""Checkpoints that an interrupted save or a damaged file cannot cost you."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from metaweight._checks import check_device_available, check_flag
from metaweight._files import file_mode, special_file, user_path, write_target


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it.

    The rename is atomic on POSIX and Windows file systems, so a save interrupted at any point
    (a crash, a full disk, a killed job) leaves the previous checkpoint at ``path`` intact and
    never a half-written one. What ``torch.save(state, path)`` keeps is kept: the permissions of
    the file replaced (a new file gets those ``open`` gives under the umask), and a symbolic link
    at ``path`` (``latest.pt -> run3/ckpt.pt``) stays a link: its target is replaced. A ``path``
    that is no file (``os.devnull``, a named pipe) is written to as ``torch.save`` writes it, never
    replaced: ``/dev/null`` stays the null device.

    Args:
        state: what to save, e.g. ``{"model": model.state_dict(), "optimizer": ...,
            "weighter": weighter.state_dict()}``.
        path: the checkpoint file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``state`` is not a dict, ``path`` not a path, or ``state`` holds something that
            cannot be pickled (a lambda, an open file): the entry is named, e.g. ``state['f']``,
            and nothing is written (a checkpoint already at ``path`` is left as it was).
        ValueError: ``path`` is a folder, or under a file.
        PermissionError: ``path`` is a write-protected file (no write permission: ``torch.save``
            refuses it too), or its folder cannot be written (the temporary file is made there; a
            folder still to be made: the nearest existing folder above it); the error names the
            folder and ``path``. Nothing is written.
    """
    if not isinstance(state, dict):
        raise TypeError(f"`state` should be a dict of what to save. Found `{type(state).__name__}`.")
    given = path = user_path(path)
    if path.is_dir():
        raise ValueError(f"`path` {path} is a folder; pass a file path in it, such as {path / 'checkpoint.pt'}. "
                         f"Nothing was written.")
    if special_file(path) is not None:  # /dev/null, a pipe: written to as torch.save writes, never replaced
        buffer = io.BytesIO()  # (whole first: an entry that cannot be saved writes nothing)
        try:
            torch.save(state, buffer)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _refuse_unpicklable(state, given, exc)
            raise
        with open(path, "wb") as f:
            f.write(buffer.getbuffer())
        return given
    path = write_target(path)  # a symbolic link (latest.pt -> run3/ckpt.pt) stays a link to the new file
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"`path` {path} cannot be created: {ancestor} is a file, not a folder. Nothing was written.")
    if path.exists() and not os.access(path, os.W_OK):  # replaced by a rename, which the file's mode does not stop
        raise PermissionError(f"`path` {path} is write-protected (no write permission on the file), as torch.save "
                              f"would refuse to overwrite it. Nothing was written. Make it writable (chmod u+w) to "
                              f"replace it, or pass another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):  # the folder the temporary file (and any missing folder) goes in
        made = f"the folder {path.parent} cannot be created in it" if ancestor != path.parent else (
            f"the checkpoint is written to a temporary file in that folder, then renamed to {path.name}, so that an "
            f"interrupted save never leaves a half-written checkpoint")
        raise PermissionError(f"`path` {path} cannot be written: no write permission on the folder {ancestor} "
                              f"({made}). Nothing was written. Make the folder writable, or pass a path in a folder "
                              f"you can write to.")
    missing = path.parent.relative_to(ancestor).parts
    created = [ancestor.joinpath(*missing[:i + 1]) for i in range(len(missing))]  # the folders this save makes
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, file_mode(path))  # the old file's permissions, or open()'s (mkstemp's are owner-only)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for folder in reversed(created):  # the folders this save made: gone again, as if never called
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, (pickle.PicklingError, TypeError, AttributeError)):
            _refuse_unpicklable(state, given, exc)
        raise
    return given


def _refuse_unpicklable(state: dict[str, Any], given: Path, exc: BaseException) -> None:
    """Raise a ``TypeError`` naming the entry of ``state`` that cannot be pickled, where ``exc`` (a failed save
    to ``given``) came from one; return otherwise."""
    where = _unpicklable(state, "state")
    if where is not None:
        raise TypeError(f"{where[0]} cannot be saved: {where[1]}. A checkpoint holds data (tensors, "
                        f"numbers, strings, lists, dicts, state_dict()s), not functions, lambdas, open files "
                        f"or locks: save what rebuilds it instead (e.g. its settings). Nothing was written "
                        f"({given} is as it was).") from exc


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


def _pickles(value: Any) -> BaseException | None:
    """Why ``value`` cannot be pickled (tensors stand in as ids: their data are not copied), or ``None``."""
    pickler = pickle.Pickler(_Sink(), protocol=pickle.DEFAULT_PROTOCOL)
    pickler.persistent_id = lambda obj: id(obj) if isinstance(obj, (torch.Tensor, torch.UntypedStorage)) else None
    try:
        pickler.dump(value)
    except Exception as exc:  # pickle raises PicklingError, TypeError or AttributeError, and __reduce__ anything
        return exc
    return None


def _unpicklable(value: Any, where: str) -> tuple[str, str] | None:
    """The deepest entry of nested dicts, lists and tuples that cannot be pickled, as
    ``('state["optimizer"]["fn"]', why)``, or ``None`` when all of ``value`` pickles."""
    why = _pickles(value)
    if why is None:
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    for key, item in items:
        inner = _unpicklable(item, f"{where}[{key!r}]")
        if inner is not None:
            return inner
    return f"`{where}` (a {type(value).__name__})", f"{type(why).__name__}: {why}"


def _safe_types() -> list[Any]:
    """Types common in training checkpoints that hold data and run no code of their own when
    unpickled: the library's own results (:class:`MetaStepRecord`, :class:`Calibration`, :class:`BudgetCurve` and its
    :class:`BudgetPoint`, :class:`AnytimeResult`, :class:`ExitCosts`, :class:`AccuracyTarget`:
    dataclasses of numbers, lists and strings; :class:`EarlyExitResult` and :class:`ExitAssignment`:
    named pairs of tensors), NumPy scalars, dtypes and arrays (their items go through the same restricted
    unpickler), ``argparse.Namespace`` (plain attributes) and ``pathlib`` paths (strings)."""
    import argparse
    import pathlib

    from metaweight._anytime import AnytimeResult
    from metaweight._budget import BudgetCurve, BudgetPoint, ExitAssignment
    from metaweight._calibration import Calibration
    from metaweight._early_exit import EarlyExitResult
    from metaweight._flops import ExitCosts
    from metaweight._record import MetaStepRecord
    from metaweight._risk import AccuracyTarget

    types: list[Any] = [MetaStepRecord, Calibration, BudgetCurve, BudgetPoint, AnytimeResult, ExitCosts, AccuracyTarget,
                        EarlyExitResult, ExitAssignment, argparse.Namespace, pathlib.PurePath, pathlib.PurePosixPath,
                        pathlib.PureWindowsPath, pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return types
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    if multiarray is None:  # NumPy 1.x
        multiarray = np.core.multiarray
    types += [multiarray.scalar, multiarray._reconstruct, np.dtype, np.ndarray]
    types += [getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None)) if name.endswith("DType")]
    return types


def _refused_globals(path: Path) -> list[str]:
    """The globals a ``weights_only`` load refuses in an intact file; empty if it cannot tell (damaged)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # pragma: no cover - torch < 2.5
        return []
    try:
        return list(finder(path))
    except Exception:
        return []


def _is_zip(path: Path) -> bool:
    """``zipfile.is_zipfile``, which raises (instead of answering) for some damaged end records."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # an end record was found, and it is broken
        return True


def _not_torch_zip(archive: zipfile.ZipFile, failed: bool = False) -> str | None:
    """Why a readable zip is not a ``torch.save`` archive (``None`` if it has that layout): torch puts
    every member under one folder, with the pickle at ``FOLDER/data.pkl``. A TorchScript archive
    (``torch.jit.save``) has that layout too, and ``torch.load`` with ``weights_only=False`` reads it
    (through ``torch.jit.load``): named only where the load ``failed``."""
    names = archive.namelist()
    folders = {name.split("/", 1)[0] for name in names}
    if len(folders) == 1 and all("/" in name for name in names) and f"{next(iter(folders))}/data.pkl" in names:
        folder = next(iter(folders))
        if failed and (f"{folder}/constants.pkl" in names or any(n.startswith(f"{folder}/code/") for n in names)):
            return ("is a TorchScript archive (torch.jit.save: a scripted or traced module, its code beside its "
                    "weights), not a checkpoint torch.save writes: load it with torch.jit.load. Check the path.")
        return None
    shown = names[:5] + (["..."] if len(names) > 5 else [])
    npz = names and all(name.endswith(".npy") for name in names)
    return (f"is a zip archive, but not one torch.save writes (its members {shown} are not one folder holding "
            f"data.pkl)" + ("; it looks like NumPy's .npz: load it with numpy.load" if npz else "") +
            ". Check the path.")


def _inconsistent(path: Path, archive: zipfile.ZipFile) -> str | None:
    """A disagreement between the zip's central directory and the rest of the file (which Python's
    zipfile tolerates and torch's reader refuses), or ``None``."""
    data = path.read_bytes()
    end = data.rfind(b"PK\x05\x06")
    if end < 0 or len(data) < end + 22:
        return "its end-of-archive record is missing"
    disk, start_disk, on_disk, total = (int.from_bytes(data[end + i:end + i + 2], "little") for i in (4, 6, 8, 10))
    if disk or start_disk or on_disk != total or total != len(archive.infolist()):
        return "its end-of-archive record is inconsistent"
    for info in archive.infolist():
        at = info.header_offset
        header = data[at:at + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return f"the local header of member {info.filename!r} is missing"
        method = int.from_bytes(header[8:10], "little")
        length = int.from_bytes(header[26:28], "little")
        if method != info.compress_type or data[at + 30:at + 30 + length] != info.filename.encode():
            return f"the local header of member {info.filename!r} disagrees with the central directory"
    return None


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a torch.save before torch 1.6
TRUNCATED = "truncated, e.g. a copy or a save that did not finish"


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def _pickle_stream(data: bytes) -> tuple[bool, str | None]:
    """Whether ``data`` is an old-format ``torch.save`` (its first pickle is torch's magic number),
    and what cuts its pickles short, if anything: walked opcode by opcode (nothing is unpickled
    but that one number), the five pickles of an old torch.save, or the one of a pickle.dump."""
    stream, ends, legacy = io.BytesIO(data), [], False
    while len(ends) < (5 if legacy else 1) and stream.tell() < len(data):
        try:
            for _ in pickletools.genops(stream):
                pass
        except Exception as exc:  # pickletools says ValueError; a broken stream may say anything
            if stream.tell() >= len(data):
                return legacy, f"its pickled data end early, at byte {len(data)} ({TRUNCATED})"
            return legacy, f"its pickled data are corrupt near byte {stream.tell()} ({exc})"
        ends.append(stream.tell())
        if len(ends) == 1:
            try:
                legacy = _NoGlobals(io.BytesIO(data[:ends[0]])).load() == LEGACY_MAGIC
            except Exception:
                legacy = False
    if legacy and len(ends) < 5:
        return legacy, f"it holds {len(ends)} of the 5 pickles of an old torch.save ({TRUNCATED})"
    return legacy, None


def _file_problem(path: Path, weights_only: bool = True, error: BaseException | None = None) -> str | None:
    """What is wrong with the file at ``path`` itself, and what to do; ``None`` for an intact
    ``torch.save`` archive (its layout, its headers and every member's checksum)."""
    size = path.stat().st_size
    if size == 0:
        return ("is empty (0 bytes): nothing was ever written to it. Resume from an earlier checkpoint, or check "
                "the path.")
    with path.open("rb") as f:
        head = f.read(8)
    zipped = _is_zip(path)
    if zipped and not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # Python's zipfile skips bytes before
        # an archive (it finds the end record from the back); torch's reader needs the archive at byte 0
        start = path.read_bytes().find(b"PK\x03\x04")
        before = f"{start} bytes before the archive" if start > 0 else "no archive member where it should start"
        return (f"is damaged: it holds a zip archive, but the file ({size} bytes) starts with {head!r}: {before} "
                f"(torch.save's archive starts at the first byte with b'PK\\x03\\x04', and torch.load reads no other). "
                f"Resume from an earlier checkpoint.")
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()  # the first member whose checksum fails, None if all pass
                if damaged is None:
                    broken = _inconsistent(path, archive)
                    if broken is not None:
                        return (f"is damaged: a zip archive ({size} bytes) whose structure is broken ({broken}). "
                                f"Resume from an earlier checkpoint.")
                    other = _not_torch_zip(archive, error is not None)  # intact, but another kind of zip
                    if other is not None:
                        return other
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError, NotImplementedError) as exc:
            return (f"is damaged: a zip archive ({size} bytes) whose structure is broken ({type(exc).__name__}: "
                    f"{exc}). Resume from an earlier checkpoint.")
        if damaged is None:
            return None
        return (f"is damaged: a torch.save archive ({size} bytes) whose member {damaged!r} fails its checksum. "
                f"Resume from an earlier checkpoint.")
    if head.startswith(b"PK"):
        return (f"is damaged: it starts as a torch.save archive but its end is missing ({size} bytes; truncated, e.g. "
                f"a copy or a save that did not finish). Resume from an earlier checkpoint.")
    if head[:1] == b"\x80":
        legacy, broken = _pickle_stream(path.read_bytes())
        if broken is None and legacy and "unexpected EOF" in str(error):  # the tensor data after the pickles
            broken = f"its tensor data end early ({TRUNCATED})"
        if broken is not None:
            kind = (f"an old-format torch.save ({size} bytes; the format before torch 1.6, or with "
                    f"_use_new_zipfile_serialization=False)" if legacy else f"a pickle stream ({size} bytes)")
            return f"is damaged: {kind} whose end is missing or broken: {broken}. Resume from an earlier checkpoint."
        if not weights_only:  # torch.load already failed on it with weights_only=False: no old torch.save
            return (f"is a pickle stream ({size} bytes) that torch.load cannot read even with weights_only=False: "
                    f"not the zip archive torch.save writes, nor an old (pre-1.6) torch.save; written by "
                    f"pickle.dump (if you trust it, read it with pickle.load), or damaged.")
        return (f"is a pickle stream ({size} bytes), not the zip archive torch.save writes: written by pickle.dump, "
                f"or by torch.save before torch 1.6 (or with _use_new_zipfile_serialization=False), or damaged. If "
                f"you trust it, load it with load_checkpoint(path, weights_only=False) (an old torch.save) or "
                f"pickle.load (a pickle.dump).")
    return (f"is not a torch checkpoint: torch.save writes a zip archive (starting with b'PK'), this file ({size} "
            f"bytes) starts with {head!r}. Check the path.")


def _check_map_location(map_location: Any) -> Any:
    """Refuse a device torch cannot parse, or one this machine does not have (``cpu:1``, a missing GPU),
    before the file is read (torch.load would fail restoring the first tensor); return ``map_location``
    with ``cpu:0`` read as ``cpu``: the CPU is one device, and torch.load, which takes ``cpu`` only,
    fails on ``cpu:0`` ("don't know how to restore data location") where every other torch call
    takes it; a dict's devices as str, which torch.load's dict form needs."""
    names = map_location.values() if isinstance(map_location, dict) else [map_location]
    for name in names:
        if isinstance(name, (str, torch.device)):
            try:
                device = torch.device(name)
            except (RuntimeError, ValueError):
                raise ValueError(f"Invalid map_location: {map_location!r}. Expected a device such as 'cpu' or "
                                 f"'cuda:0', a torch.device, a dict of them or a function.") from None
            check_device_available(device, "map_location")
        elif not (name is None or isinstance(name, torch.device) or callable(name)):
            raise TypeError(f"`map_location` should be a device (str or torch.device), a dict of them, a function "
                            f"or None. Found `{type(map_location).__name__}`.")

    def one(name: Any, as_str: bool) -> Any:
        if not isinstance(name, (str, torch.device)):
            return name
        device = torch.device("cpu") if torch.device(name).type == "cpu" else torch.device(name)
        return str(device) if as_str or isinstance(name, str) else device

    if isinstance(map_location, dict):  # torch.load reads a dict's values as str only
        return {k: one(v, True) for k, v in map_location.items()}
    return one(map_location, False)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = None,
                    weights_only: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or ``torch.save``).

    With ``weights_only=True`` (the default, safe for files from elsewhere) the library's own
    results (``Calibration``, ``BudgetCurve``, ``BudgetPoint``, ``AnytimeResult``, ``ExitCosts``,
    ``AccuracyTarget``, ``EarlyExitResult``, ``ExitAssignment``) and the common
    harmless types of training checkpoints load too: NumPy scalars and arrays, ``argparse.Namespace`` and
    ``pathlib`` paths (an allow-list, ``torch.serialization.safe_globals``). Two failures are told
    apart, each with a ``ValueError`` that names the file and what to do: an intact file holding
    other types (named; load it with ``weights_only=False`` if you trust it), and a file that is
    empty, truncated, fails its checksums or has bytes before its archive (which Python's
    ``zipfile`` reads past and ``torch.load`` does not: resume from an earlier checkpoint) or is no torch
    checkpoint at all (check the path; a pickle is said to be one). The diagnosis is read from the
    file itself; torch's own error is chained to it, never cut short.

    ``torch.load`` does not check the CRC-32 that a ``torch.save`` archive stores for each member,
    so a flipped byte inside the tensor data would load as a wrong weight without a word; with
    ``verify=True`` (the default) every member's checksum is checked first, one extra read of the
    file, and a mismatch is refused as damaged.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).
        weights_only: passed to ``torch.load``; ``True`` (tensors, dicts, numbers, strings and the
            types above only) is safe for files from elsewhere.
        verify: check every member's CRC-32 before loading (zip archives; the legacy pickle
            format has no checksums).

    Returns:
        The dict that was saved.

    Raises:
        FileNotFoundError: nothing (or a folder) at ``path``.
        ValueError: the file cannot be loaded (see above), or holds something other than a dict.
        ValueError: ``map_location`` names a device that does not parse or that this machine
            does not have (``"cpu:1"``, ``"cuda"`` without a GPU), before the file is read.
        TypeError: ``path`` is not a path, or ``weights_only`` or ``verify`` not a bool.
    """
    weights_only, verify = check_flag(weights_only, "weights_only"), check_flag(verify, "verify")
    path = user_path(path)
    map_location = _check_map_location(map_location)
    if not path.is_file():
        kind = "a folder" if path.is_dir() else special_file(path)
        raise FileNotFoundError(f"{path} is {kind}, not a checkpoint file; give the file's path." if kind
                                else f"No checkpoint at {path}.")
    if verify and _is_zip(path):  # torch.load would not notice a member failing its checksum
        problem = _file_problem(path)
        if problem is not None:
            raise ValueError(f"The checkpoint {path} {problem}")
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        if weights_only and allow is not None:
            with allow(_safe_types()):
                state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # a damaged pickle raises anything (KeyError, UnicodeDecodeError, ...)
        problem = _file_problem(path, weights_only, exc)  # read from the file: a damaged one is never called intact
        if problem is None and "zip archive" in str(exc):  # torch's zip reader refused a structure we passed
            problem = (f"is damaged: torch's zip reader refuses its structure ({str(exc).splitlines()[0][:120]}). "
                       f"Resume from an earlier checkpoint.")
        if problem is not None:
            raise ValueError(f"The checkpoint {path} {problem}") from exc  # torch's own words chained below
        refused = _refused_globals(path) if weights_only and isinstance(exc, pickle.UnpicklingError) else []
        if refused:
            raise ValueError(f"The checkpoint {path} is intact, but holds types that loading with weights_only=True "
                             f"refuses: {refused}. If you trust the file, load it with "
                             f"load_checkpoint(path, weights_only=False); or allow those types with "
                             f"torch.serialization.add_safe_globals([...]) before loading.") from None
        raise ValueError(f"The checkpoint {path} is an intact torch.save archive, but torch.load failed on it: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"The checkpoint {path} holds a `{type(state).__name__}`, not a dict of states.")
    return state
