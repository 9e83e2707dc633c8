"""Names of files from users and requests, confined to gmi's folders; server paths kept out of messages.

Every parameter that names a file (prompt set, encoder, checkpoint, spec key, thumbnail) goes through
:func:`resolve_inside` or :func:`check_component`: after normalisation the file must lie inside one of the
allowed roots (symlinks resolved), and errors never echo an absolute path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

from .errors import InvalidInput, NotFound

DEFAULT_HOME = Path(os.environ.get("GMI_HOME", Path.home() / ".cache" / "gmi"))  # gmi's data folder outside a host

_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}")
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/~-])(?:[A-Za-z]:)?[\\/](?:[^\s'"\\/]+[\\/])*([^\s'"\\/,;)]*)""")


def check_component(name: str, what: str) -> str:
    """A single file-name-like token (model name, tag): no separators, no '..', no encoded forms."""
    if not isinstance(name, str) or not _COMPONENT.fullmatch(name) or ".." in name:
        raise InvalidInput(f"{what} must be a plain name (letters, digits, . _ + @ -)")
    return name


def _rejected_name(text: str) -> str | None:
    """Why a relative name is refused before touching the disk, or None when its form is acceptable."""
    if not text or len(text) > 1000 or "\x00" in text or any(ord(c) < 32 for c in text):
        return "empty or invalid name"
    if unquote(text) != text:
        return "URL-encoded names are not accepted"
    if "\\" in text or PureWindowsPath(text).drive:
        return "backslashes and drive letters are not accepted"
    if ".." in PurePosixPath(text).parts:
        return "'..' is not accepted"
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(name: str, roots: Sequence[Path], what: str, allow_absolute: bool = False) -> Path:
    """The regular file ``name`` names inside one of ``roots``, after resolving symlinks and normalising.

    A relative name is looked up under each root in turn; an absolute one (only with ``allow_absolute``, for
    values from the host's settings) must itself lie inside a root. InvalidInput for a refused form, NotFound
    when no allowed file matches; neither message contains a server path.
    """
    text = str(name)
    absolute = text.startswith(("/", "\\")) or bool(PureWindowsPath(text).drive)
    shown = "(an absolute path)" if absolute else repr(text[:200])
    if absolute and not allow_absolute:
        raise InvalidInput(f"{what} {shown}: absolute paths are not accepted; give a name inside gmi's folders")
    reason = None if absolute else _rejected_name(text)
    if reason:
        raise InvalidInput(f"{what} {shown}: {reason}")
    real_roots = [Path(r).resolve() for r in roots]
    candidates = [Path(text)] if absolute else [root / text for root in real_roots]
    for candidate in candidates:
        try:
            real = candidate.resolve()
            mode = real.stat().st_mode
        except (OSError, RuntimeError):
            continue
        if any(_inside(real, root) for root in real_roots) and stat.S_ISREG(mode):
            return real
    raise NotFound(f"{what} {shown} is not a file inside gmi's folders")


def offered(resolve: Callable[[str], Path], name: str) -> bool:
    """Whether ``resolve`` (the function that opens a picked name) accepts ``name``: a host's choice list offers
    only these, so nothing listed (a symlink out of the folder, say) is refused once picked."""
    try:
        resolve(name)
    except (InvalidInput, NotFound):
        return False
    return True


def folder_inside(root: Path, subfolder: str, what: str = "folder") -> Path:
    """The folder ``subfolder`` names inside ``root`` (a host's output/input/models folder), symlinks resolved.

    Empty names the root itself. Absolute paths, '..', encoded forms and symlinks that leave the root are
    InvalidInput; a folder that does not exist is NotFound. Messages never contain a server path.
    """
    raw = str(subfolder or "").strip()
    if raw.startswith(("/", "\\")) or PureWindowsPath(raw).drive:
        raise InvalidInput(f"{what} (an absolute path): absolute paths are not accepted; give a folder inside the root")
    text = raw.rstrip("/")
    shown = repr(text[:200]) if text else "'.'"
    reason = _rejected_name(text) if text else None
    if reason:
        raise InvalidInput(f"{what} {shown}: {reason}")
    real_root = Path(root).resolve()
    try:
        real = (real_root / text).resolve() if text else real_root
    except (OSError, RuntimeError):
        raise NotFound(f"{what} {shown} is not a folder inside the root") from None
    if not _inside(real, real_root):
        raise InvalidInput(f"{what} {shown} leaves the root folder (a link out of it)")
    if not real.is_dir():
        raise NotFound(f"{what} {shown} is not a folder inside the root")
    return real


def inside(path: Path, root: Path) -> bool:
    """``path`` lies in ``root`` after resolving symlinks (a file found while walking a folder)."""
    try:
        return _inside(Path(path).resolve(), Path(root).resolve())
    except (OSError, RuntimeError):
        return False


def shown(path: str | os.PathLike, parts: int = 2) -> str:
    """How a message names a file: its last ``parts`` components (``<sha256>/<name>.safetensors`` for a spec,
    ``clip/<file>`` for weights), never the absolute server path. Messages are built with it in the first place."""
    return "/".join(Path(os.fspath(path)).parts[-parts:])


def without_path(text: str, path: str | os.PathLike) -> str:
    """An exception's text with ``path`` (as given and resolved) replaced by :func:`shown` (a library's message)."""
    for form in {os.fspath(path), str(Path(os.fspath(path)).resolve())}:
        text = str(text).replace(form, shown(path))
    return text


def redact(message: str) -> str:
    """A message for an HTTP body: absolute server paths reduced to their last component."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "(path)", str(message))


def one_line(exc: BaseException) -> str:
    """An OS or other error as one line, without the server path (for HTTP bodies and status fields)."""
    if isinstance(exc, OSError) and exc.strerror:
        name = Path(str(exc.filename)).name if exc.filename else ""
        return f"{exc.strerror}" + (f": {name}" if name else "")
    text = str(exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc), else set and restored once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # at import, before any request thread exists
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_read_umask()


def set_default_mode(path) -> None:
    """Temp files from mkstemp are 0600; a finished file gets the mode any other new file would get."""
    with suppress(OSError):
        os.chmod(path, FILE_MODE)


@contextmanager
def atomic_write(path) -> Iterator[str]:
    """The one way gmi writes a file: yields a temp file name beside ``path`` to write; when the block ends
    without error the temp file gets the default mode and is renamed over ``path``, else it is removed. Readers
    see the old file or the new one, never a part; temp names match ``<name>.*.tmp`` (cleaned up by the store)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", shown(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        set_default_mode(tmp)
        os.replace(tmp, path)
    except OSError:
        raise
    except Exception as exc:
        os_error = os_error_of(exc)
        if os_error is None:
            raise
        raise os_error from exc  # a writer library's wrapped OS error (safetensors: "Os { code: 28, .. }")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_WRAPPED_OS_ERROR = re.compile(r"Os \{ code: (\d+)")


def os_error_of(exc: BaseException) -> OSError | None:
    """The OS error a library reports as its own exception (safetensors' SafetensorError wraps Rust's io::Error),
    so every write path reports disk full or read-only the same way; None when it is none."""
    found = _WRAPPED_OS_ERROR.search(str(exc))
    if not found:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def user_output(path, force: bool, written_by_gmi) -> Path:
    """A command's ``--out`` file, checked before any work: not a folder, and an existing file that gmi did not
    write (``written_by_gmi(path)`` is False) is replaced only with ``--force``."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"--out {path} is a folder; give a file name")
    if path.exists() and not force and not written_by_gmi(path):
        raise InvalidInput(f"--out {path} exists and was not written by gmi; add --force to replace it")
    return path


def write_json_atomic(path, data, **dump_options) -> None:
    """JSON (never NaN unless ``dump_options`` say otherwise) written through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, **{"indent": 1, "allow_nan": False, **dump_options}), encoding="utf-8")
