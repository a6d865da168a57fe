"""Files written in place of an old one: where the write goes, and the permissions it keeps."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def is_path(value: object) -> bool:
    """Whether ``value`` is a path a user may give: a non-empty ``str`` or ``os.PathLike`` (``Path``,
    pytest's ``tmpdir``) that reads as a ``str``."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    return isinstance(text, str) and bool(text)


def user_path(path: str | os.PathLike[str], name: str = "path", *, absolute: bool = True) -> Path:
    """A path the user gave (``name``: the argument, for the error), as an absolute ``Path`` with a
    leading ``~`` (or ``~user``) expanded to the home folder, as a shell would:
    ``CSVLogger("~/log.csv")`` writes in the home folder, not in a folder named ``~``. Made absolute
    against the working folder of the call, so an object holding it (a logger) keeps writing there
    after an ``os.chdir``; with ``absolute=False`` left relative, for a one-shot call (a figure saved,
    the ``plot`` CLI) that holds no path across time and shows paths as they were typed. The one
    reading of every path the library takes from its users; anything but a non-empty ``str`` or
    ``os.PathLike`` is a ``TypeError``."""
    if not is_path(path):
        raise TypeError(f"`{name}` should be a file path (a non-empty str, Path or other os.PathLike). "
                        f"Found {path!r}.")
    path = Path(os.path.expanduser(os.fspath(path)))
    return path.absolute() if absolute else path


def special_file(path: Path) -> str | None:
    """What ``path`` is where it exists and is neither a regular file nor a folder (followed through
    symbolic links): ``"a character device"`` (``/dev/null``), ``"a block device"``, ``"a named pipe
    (FIFO)"`` or ``"a socket"``; ``None`` otherwise (a file, a folder, nothing there). Such a path is
    written to as ``open`` writes it, never replaced by a rename (which would put a regular file in
    place of ``/dev/null``), and holds no log or checkpoint to read back."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), None)


def write_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a symbolic link's target (followed to the end), so that the
    link stays a link to the new file, as ``open(path, "w")`` would write through it; ``path`` itself
    otherwise."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _umask() -> int:
    """This process's umask: read from ``/proc`` where there is one (Linux), since ``os.umask`` can only
    be read by setting it, which another thread creating a file meanwhile would see."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path) -> int:
    """The permission bits a file rewritten at ``path`` keeps: those of the file there, or for a new file
    those ``open(path, "w")`` gives (0o666 less the umask), never ``mkstemp``'s owner-only 0o600."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()
