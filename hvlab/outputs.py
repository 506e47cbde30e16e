"""Where a run writes: a folder no other run shares, files that are whole or absent, and Ctrl-C held while saving.

* `atomic_write` writes through a temporary file in the same folder and renames it into place (``os.replace``
  is atomic on POSIX and Windows), so a crash, a full disk or a Ctrl-C leaves the old file or none, never half.
* `OutputFolder.claim` takes a folder for one run. The default ``outputs/<timestamp>/`` gets a suffix
  (``_2``, ``_3``, ...) when another run took that name in the same second; a ``--save-path`` the user chose is
  refused when it already holds files (another run's results are never written over). The claim itself is a
  lock file made with ``O_CREAT | O_EXCL``, which exactly one process can create, so two runs started at the
  same moment with one ``--save-path`` cannot both get it: the second is refused and told which run holds it.
  `OutputFolder.release` removes the lock and, if the run failed before writing anything, the folder it made.
* `holding_sigint` defers Ctrl-C while a resume file is written, so that the file a Ctrl-C asks for is
  not itself cut short by a second one.

Torch-free: the CLI claims its folder before the model loads.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

LOCK_NAME = ".hvlab-run.lock"
STATE_FILES = ("interrupted.pt",)  # with nan_step*.pt: what a stopped run leaves, and a resume may write beside


class OutputFolderError(ValueError):
    """The output folder cannot be used (taken, not a folder, not writable); the message says why and what to do."""


def atomic_write(path, write: Callable[[Path], object]) -> str:
    """Call ``write(tmp)`` for a temporary file beside ``path`` (same extension, so writers that pick the format
    from it still work), then rename it to ``path``. Returns ``str(path)``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return str(path)


def write_text(path, text: str) -> str:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def holding_sigint(reraise: bool = True):
    """Defer SIGINT (Ctrl-C) inside the block; one that arrived is raised after it (``reraise``) or dropped.

    Only the main thread can install signal handlers; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived and reraise:
            raise KeyboardInterrupt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class OutputFolder:
    """A folder claimed by one run (see the module docstring). ``path`` is absolute; ``note`` says how it was
    chosen when that is worth telling (a suffix was added, or a resume writes beside its file)."""

    def __init__(self, path: Path, created: bool, note: str | None = None):
        self.path, self.created, self.note = path, created, note
        self.lock = path / LOCK_NAME

    @classmethod
    def claim(cls, save_path=None, root="outputs", resume_file=None, flag: str = "--save-path",
              resuming: bool = False) -> "OutputFolder":
        """Claim ``save_path`` (must be new or empty), or else a fresh ``root/<timestamp>[_k]``. With
        ``resume_file`` and no ``save_path``, the folder holding that file. A resumed run (``resume_file`` or
        ``resuming``) may write beside the files a stopped run leaves (interrupted.pt, nan_step*.pt)."""
        resuming = resuming or resume_file is not None
        allowed = _state_file if resuming else (lambda name: False)
        if save_path is None and resume_file is not None:
            folder = Path(resume_file).resolve().parent
            return cls._take(folder, flag=f"the folder of {resume_file}", allowed=allowed,
                             advice=f"pass {flag} for a new folder")
        if save_path is not None:
            if not str(save_path).strip():  # Path("") is the current folder: never write into it by accident
                raise OutputFolderError(f"{flag} is empty ({str(save_path)!r}): name a new folder, or leave {flag} "
                                        f"out for a fresh {root}/<timestamp>/")
            return cls._take(Path(save_path).resolve(), flag=f"{flag} {save_path}", allowed=allowed,
                             advice=f"choose a new folder, or leave {flag} out for a fresh {root}/<timestamp>/")
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        base = Path(root).resolve() / stamp
        for k in range(1, 1000):
            folder = base if k == 1 else base.with_name(f"{stamp}_{k}")
            _make_parents(folder.parent, f"the output root {root}")
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            note = None if k == 1 else f"{base} was taken by another run: writing to {folder}"
            return cls._take(folder, flag=str(folder), created=True, note=note, advice="")
        raise OutputFolderError(f"could not create a new folder under {base.parent}: 999 runs in the same second?")

    @classmethod
    def _take(cls, folder: Path, flag: str, advice: str, allowed=lambda name: False, created: bool | None = None,
              note: str | None = None) -> "OutputFolder":
        if created is None:
            if folder.exists() and not folder.is_dir():
                raise OutputFolderError(f"{flag} is a file, not a folder: {advice}")
            _make_parents(folder.parent, flag)
            try:
                os.mkdir(folder)
                created = True
            except FileExistsError:
                created = False
                if not folder.is_dir():
                    raise OutputFolderError(f"{flag} is a file, not a folder: {advice}") from None
            except OSError as e:
                raise OutputFolderError(f"cannot create {flag}: {e.strerror} ({folder})") from None
        out = cls(folder, created, note)
        try:
            fd = os.open(out.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise OutputFolderError(out._held_message(flag)) from None
        except OSError as e:
            raise OutputFolderError(f"cannot write in {flag}: {e.strerror} ({folder})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        others = sorted(n for n in os.listdir(folder) if n != LOCK_NAME and not allowed(n))
        if others:
            out.release(failed=False)
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise OutputFolderError(f"{flag} already holds files ({shown}); hvlab never writes over another "
                                    f"run's results: {advice}")
        return out

    def _held_message(self, flag: str) -> str:
        try:
            pid = int(self.lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None and not _pid_alive(pid):
            return (f"{flag} is locked by hvlab run {pid}, which is no longer running (it was killed): if no run "
                    f"uses the folder, delete {self.lock} and try again")
        return (f"{flag} is in use by another hvlab run (pid {pid}); runs never share a folder: wait for it, or "
                f"pass a different --save-path")

    def release(self, failed: bool) -> None:
        """Drop the lock; after a failure, also remove the folder if this run made it and left nothing in it."""
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()
        if failed and self.created:
            with contextlib.suppress(OSError):  # not empty (a resume file was saved): it stays
                os.rmdir(self.path)


def _state_file(name: str) -> bool:
    return name in STATE_FILES or (name.startswith("nan_step") and name.endswith(".pt"))


def _make_parents(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise OutputFolderError(f"{what}: cannot make a folder under {blocker}, which is a file") from None
    except OSError as e:
        raise OutputFolderError(f"{what}: cannot create {folder}: {e.strerror}") from None
