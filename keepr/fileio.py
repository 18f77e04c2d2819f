"""Atomic output, output locks, stale temporaries and content hashes.

Everything KEEP:R writes goes to a temporary name next to its destination and is renamed into place only when
complete, so an interrupted or failed run never leaves a half-written file or directory behind.

Temporaries carry their owner in their name::

    .{name}.keepr-{host}-{pid}-{start}-{random}{suffix}.tmp

``host`` is a short hash of the host name, ``pid`` the writing process and ``start`` that process's start time
(``/proc/<pid>/stat`` field 22, clock ticks since boot; 0 where it cannot be read), so a temporary left by a killed
run (SIGKILL, power loss: no ``finally`` runs) is recognised by the next run into the same place and removed
(:func:`remove_stale_temporaries`): only names of this exact form, made on this host, whose process is gone (not
running, a zombie, or its pid reused by a process that started at another time). Anything else is never touched.

Destinations are resolved first (symlinks followed): writing to a symlink puts the result where it points and leaves
the symlink as it is. A destination directory that is a mount point cannot be replaced by a rename; the temporary
directory is made inside it and its entries are moved into it at the end (each move is a rename on the same file
system). OSErrors about the output (disk full, quota, read-only file system, a permission or path problem under the
output) become a one-line :class:`~keepr.errors.KeeprError` naming the output and the cause, with the temporary
removed.

:func:`output_lock` keeps two runs from writing the same output at the same time (``flock`` on ``.{name}.lock`` next
to it; the kernel releases it when the process dies, so a killed run never blocks the next one).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from keepr.errors import KeeprError

log = logging.getLogger(__name__)

# errnos that are always about writing (whatever path the error names).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_MAX_NAME = 120  # characters of the destination name kept in a temporary's name (file names are <= 255 bytes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Owners of temporaries.


def host_tag() -> str:
    """8 hex digits identifying this host in temporary names."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc/<pid>/stat, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may itself contain spaces or ')': split after the last ')'.
    rest = data[data.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[19])  # field 3 (state) and field 22 (starttime)
    except (IndexError, ValueError):
        return None


def process_start_time(pid: int) -> int:
    """Start time of process ``pid`` (clock ticks since boot, Linux); 0 when unknown."""
    st = _proc_stat(pid)
    return st[1] if st else 0


def process_alive(pid: int, start_time: int = 0) -> bool:
    """Whether process ``pid`` runs on this host and, when ``start_time`` is given (non-zero) and readable, is the
    process that started then (a pid can be reused after its process died). Zombies count as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OverflowError:
        return False
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc (not Linux) or unreadable: the pid exists, assume it is the owner
    state, start = st
    if state == "Z":
        return False
    return not (start_time and start != start_time)


def _prefix(name: str) -> str:
    return f".{name[:_MAX_NAME]}.keepr-"


_OWNER = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>\d{1,10})-(?P<start>\d{1,20})-(?P<rand>[0-9a-f]{8})"
                    r"(?P<suffix>.*)\.tmp$")


def temporary_owner(path: str | os.PathLike, dest: str | os.PathLike) -> tuple[str, int, int] | None:
    """(host tag, pid, start time) of a temporary of ``dest`` named by this module, or None for any other name."""
    name, pre = Path(path).name, _prefix(Path(dest).name)
    if not name.startswith(pre):
        return None
    m = _OWNER.match(name[len(pre):])
    if not m:
        return None
    return m["host"], int(m["pid"]), int(m["start"])


def _temp_name(dest_name: str, suffix: str = "") -> str:
    pid = os.getpid()
    return f"{_prefix(dest_name)}{host_tag()}-{pid}-{process_start_time(pid)}-{secrets.token_hex(4)}{suffix}.tmp"


def is_keepr_entry(name: str, dest_name: str) -> bool:
    """A temporary or the lock of ``dest_name`` made by this module (any owner)."""
    return name == f".{dest_name}.lock" or temporary_owner(name, dest_name) is not None


def is_stale(path: str | os.PathLike, dest: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary of ``dest`` made by this module on this host whose owner process is gone."""
    owner = temporary_owner(path, dest)
    if owner is None:
        return False
    host, pid, start = owner
    return host == host_tag() and not process_alive(pid, start)


def resolve_output(dest: str | os.PathLike) -> Path:
    """The absolute destination with symlinks resolved (a dangling symlink resolves to the path it points to)."""
    return Path(os.path.realpath(os.fspath(dest)))


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``dest`` left by runs that were killed; return what was removed.

    Looks next to ``dest`` (and inside it when it is a directory: temporaries for a mount point are made there) for
    names of the form ``.{name}.keepr-{host}-{pid}-{start}-{random}{suffix}.tmp`` made on this host whose process is
    gone (see :func:`is_stale`). Symlinks and every other name are left alone. Each removal is logged (warning).
    """
    dest = resolve_output(dest)
    places = [dest.parent]
    if dest.is_dir():
        places.append(dest)
    removed = []
    for place in places:
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for e in entries:
            if e.is_symlink() or not is_stale(e.name, dest):
                continue
            p = Path(e.path)
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile by another run
            except OSError as exc:
                log.warning("could not remove stale temporary %s: %s", p, exc.strerror or exc)
                continue
            _, pid, _ = temporary_owner(p, dest)
            log.warning("removed %s, a temporary output left by process %d (no longer running)", p, pid)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------------------------
# Errors.


def _under(path, roots: list[Path]) -> bool:
    if path is None or isinstance(path, int):
        return False
    try:
        p = Path(os.path.abspath(os.fsdecode(path)))
    except (TypeError, ValueError):
        return False
    return any(p == r or r in p.parents for r in roots)


def _output_error(shown, exc: OSError, roots: list[Path], space_on: Path) -> KeeprError | None:
    """A one-line KeeprError for an OSError about the output (an errno that is always about writing, or a path under
    one of ``roots``), or None when the error is about something else."""
    if exc.errno not in _WRITE_ERRNOS and not (_under(exc.filename, roots) or _under(exc.filename2, roots)):
        return None
    cause = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(space_on).free
            cause += f", {free / 1e6:.1f} MB free on {space_on}"
    elif exc.filename is not None and not isinstance(exc.filename, int):
        cause += f": {os.fsdecode(exc.filename)}"
    return KeeprError(f"{shown}: cannot write the output ({cause}); nothing was written there")


def check_empty_dir(shown, dest: Path) -> None:
    """KeeprError naming ``shown`` unless ``dest`` is missing or a directory holding nothing but our own entries."""
    if os.path.lexists(dest) and not dest.is_dir():
        raise KeeprError(f"{shown}: output exists and is not a directory")
    if dest.is_dir():
        try:
            extra = [n for n in os.listdir(dest) if not is_keepr_entry(n, dest.name)]
        except OSError as exc:
            raise KeeprError(f"{shown}: cannot read the output directory ({exc.strerror})") from None
        if extra:
            raise KeeprError(f"{shown}: output directory exists and is not empty; choose another --out or remove it")


def _mkdir_parent(shown, dest: Path) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeeprError(f"{shown}: cannot create the directory {dest.parent} ({exc.strerror})") from None


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------------------------
# Atomic outputs.


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "", clean_stale: bool = True) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; rename it onto ``dest`` on success, delete it on failure.

    ``suffix`` keeps an extension on the temporary name for writers that pick the format from it (e.g. '.mp4').
    ``dest`` is resolved (a symlink is written through). Stale temporaries of ``dest`` are removed first
    (``clean_stale``). OSErrors about the output (disk full, ...) become a one-line KeeprError.
    """
    shown = dest
    dest = resolve_output(dest)
    _mkdir_parent(shown, dest)
    if clean_stale:
        remove_stale_temporaries(dest)
    while True:
        tmp = dest.parent / _temp_name(dest.name, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(shown, exc, [dest.parent], dest.parent) or exc from None
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # created 0600 while being written; give it the usual permissions
        os.replace(tmp, dest)
    except OSError as exc:
        err = _output_error(shown, exc, [tmp, dest], dest.parent)
        if err is None:
            raise
        raise err from None
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _move_into(tmp: Path, dest: Path) -> None:
    """Move the entries of ``tmp`` into the existing directory ``dest`` (same file system); undo on failure."""
    moved = []
    try:
        for name in sorted(os.listdir(tmp)):
            target = dest / name
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "written meanwhile by another process", str(target))
            os.replace(tmp / name, target)
            moved.append(target)
        tmp.rmdir()
    except BaseException:
        for target in moved:
            _remove(target)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, clean_stale: bool = True,
               on_stale: Callable[[list[Path]], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory for the output ``dest``; its contents become ``dest`` only when the block succeeds.

    ``dest`` must not exist yet, or be an empty directory (our own temporaries and lock file aside); otherwise
    KeeprError before the block runs. On failure the temporary directory is removed and ``dest`` is left as it was.

    - ``dest`` is resolved first: if it is a symlink (to an empty directory, or dangling), the output ends up where
      it points and the symlink is left intact.
    - If ``dest`` is a mount point it cannot be renamed over: the temporary directory is made inside it and its
      entries are moved into it at the end.
    - Stale temporaries of ``dest`` (killed runs) are removed first (``clean_stale``); ``on_stale`` is called with
      the list of removed paths (also logged as warnings).
    - OSErrors about the output (disk full, quota, read-only, permission, path problems under the output) become a
      one-line KeeprError naming ``dest`` and the cause.
    """
    shown = dest
    dest = resolve_output(dest)
    check_empty_dir(shown, dest)
    _mkdir_parent(shown, dest)
    if clean_stale:
        removed = remove_stale_temporaries(dest)
        if on_stale is not None and removed:
            on_stale(removed)
    # A mount point cannot be renamed over, nor an empty directory whose parent is read-only: write into it.
    into = dest.is_dir() and (os.path.ismount(dest) or not os.access(dest.parent, os.W_OK | os.X_OK))
    where = dest if into else dest.parent
    while True:
        tmp = where / _temp_name(dest.name)
        try:
            os.mkdir(tmp, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(shown, exc, [where], where) or exc from None
    try:
        yield tmp
        if into:
            _move_into(tmp, dest)
        else:
            os.chmod(tmp, 0o777 & ~_umask())  # made 0700 while being written
            if dest.is_dir():
                check_empty_dir(shown, dest)  # something appeared there meanwhile: refuse, never replace it
                try:
                    dest.rmdir()
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise KeeprError(f"{shown}: output directory exists and is not empty (written meanwhile?); "
                                         "choose another --out or remove it") from None
                    raise
            os.replace(tmp, dest)
    except OSError as exc:
        err = _output_error(shown, exc, [tmp, dest], where)
        if err is None:
            raise
        raise err from None
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


# ------------------------------------------------------------------------------------------------------------------
# One writer per output.


def lock_path(dest: str | os.PathLike) -> Path:
    """Where :func:`output_lock` puts the lock of ``dest``: ``.{name}.lock`` next to the resolved destination, or
    inside it when it is an existing directory whose parent is not writable (e.g. a mount point at ``/out``)."""
    dest = resolve_output(dest)
    name = f".{dest.name}.lock"
    parent = dest.parent
    if dest.is_dir() and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK) \
            and os.access(dest, os.W_OK | os.X_OK):
        return dest / name
    return parent / name


def _read_pid(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        if text:
            return str(int(text.split()[0]))
    return "unknown"


@contextlib.contextmanager
def output_lock(dest: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``dest`` for the block; yield the resolved destination.

    A second holder (another process, or another ``output_lock`` in this one) fails at once with a one-line
    KeeprError naming the pid that holds it. The lock file (``lock_path(dest)``, holding the owner's pid) is removed
    on exit; one left behind by a killed process does not block (the kernel drops ``flock`` locks of dead
    processes). Where the file system does not support locks the block runs unlocked (logged).
    """
    shown = dest
    target = resolve_output(dest)
    _mkdir_parent(shown, target)
    path = lock_path(target)
    try:
        import fcntl  # POSIX only (absent on Windows)
    except ImportError:  # not POSIX
        yield target
        return
    fd = None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise KeeprError(f"{shown}: cannot create the lock file {path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KeeprError(f"{shown}: another KEEP:R run is writing to it (pid {_read_pid(path)}); wait for it to "
                             f"finish or choose another --out") from None
        except OSError as exc:  # e.g. ENOLCK: no locking on this file system
            log.warning("cannot lock %s (%s); running without an output lock", path, exc.strerror)
            os.close(fd)
            fd = None
            break
        # The holder before us may have removed the file after we opened it: lock the file that is at the path.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if fd is None:
        yield target
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is only for the message
    try:
        yield target
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                os.unlink(path)
        os.close(fd)


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))
