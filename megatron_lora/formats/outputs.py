"""Atomic outputs: write into a temporary sibling, then rename it into place.

Every directory or file this project writes appears whole or not at all:

* the destination is checked first (exists without ``overwrite``, a parent that is a file,
  the working directory) so bad output paths fail before any work;
* the temporary sibling is named ``.{name}.megatron-lora-tmp.{pid}.{token}.{host}``; a later
  write to the same destination removes those a dead process left behind (SIGKILL, power
  loss); on an error, SIGTERM or SIGINT it is removed at once;
* the rename never replaces what was not checked: without ``overwrite`` it is
  ``renameat2(RENAME_NOREPLACE)``, so a directory that appeared at the destination while
  writing stays and the write fails; with ``overwrite`` it is ``RENAME_EXCHANGE`` (the old
  directory is removed after the new one is in place);
* files and directories get the permissions the umask asks for (safetensors writes 0600).

:func:`atomic_directory` serves one process; :func:`shared_atomic_directory` serves every
rank of a torch.distributed job (rank 0 creates and renames, all ranks write and agree).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Iterator, Optional

TMP_TAG = "megatron-lora-tmp"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


# -- checks -------------------------------------------------------------------------------------


def check_destination(path: str | Path, overwrite: bool = False) -> Path:
    """The absolute destination, after refusing what cannot or must not be written.

    Errors name ``path`` as given: it exists (without ``overwrite``), it is the working
    directory or one of its parents (``overwrite`` would pull the directory from under the
    shell), or one of its parents is not a directory.
    """
    dst = Path(os.path.abspath(path))
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
        cwd = Path.cwd()
        if dst == cwd or dst in cwd.parents:
            raise ValueError(f"{path} is the working directory or contains it: --overwrite cannot "
                             "replace it (give a path outside it)")
    _check_parents(dst, path)
    return dst


def check_output_file(path: str | Path) -> Path:
    """The absolute path of an output file (replaced if present), refusing a directory or a
    parent that is not a directory."""
    dst = Path(os.path.abspath(path))
    if dst.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    _check_parents(dst, path)
    return dst


def check_flag_output(flag: str, path: str | Path, directory: bool = False) -> Path:
    """:func:`check_destination` (``directory``) or :func:`check_output_file` of a command-line
    flag's output, its error naming the flag: outputs are checked before any work."""
    try:
        return check_destination(path) if directory else check_output_file(path)
    except OSError as e:
        raise type(e)(f"{flag}: {e}") from None


def _check_parents(dst: Path, path: str | Path) -> None:
    for parent in dst.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot write {path}: {parent} is not writable")
            return


def _umask() -> int:
    # Reading the umask through os.umask changes it for a moment; /proc does not.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain create would (0666/0777 & ~umask)."""
    mask = _umask()
    os.chmod(root, (0o777 if root.is_dir() else 0o666) & ~mask)
    if root.is_dir():
        for parent, dirs, files in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(parent, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(parent, f), 0o666 & ~mask)


# -- temporary siblings ----------------------------------------------------------------------------


def _tmp_prefix(dst: Path) -> str:
    return f".{dst.name}.{TMP_TAG}."


def _tmp_path(dst: Path) -> Path:
    host = socket.gethostname().replace("/", "_")
    return dst.with_name(f"{_tmp_prefix(dst)}{os.getpid()}.{secrets.token_hex(4)}.{host}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(dst: Path) -> list[Path]:
    """Remove temporary siblings of ``dst`` left by dead processes of this host; return them."""
    removed = []
    host = socket.gethostname().replace("/", "_")
    prefix = _tmp_prefix(dst)
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid, _, rest = entry.name[len(prefix):].partition(".")
        _, _, owner = rest.partition(".")
        if pid.isascii() and pid.isdigit() and owner == host and not _pid_alive(int(pid)):
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _begin(dst: Path, directory: bool) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    tmp = _tmp_path(dst)
    if directory:
        tmp.mkdir()  # mode 0777 & ~umask, unlike mkdtemp's 0700
    return tmp


# -- renames ---------------------------------------------------------------------------------------


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the system or file system lacks it (then the caller falls back)."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``dst``: never onto something that appeared unchecked."""
    apply_umask(tmp)
    if overwrite and os.path.lexists(dst):
        if _renameat2(tmp, dst, _RENAME_EXCHANGE):
            _remove(tmp)  # now the old destination
            return
        aside = _tmp_path(dst)
        os.rename(dst, aside)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(aside, dst)  # put the old destination back
            raise
        _remove(aside)
        return
    try:
        if _renameat2(tmp, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise FileExistsError(f"{dst} appeared while it was being written: left it as it is, "
                              "wrote nothing (pass --overwrite to replace it)") from None
    # No renameat2 here: check, then rename (a narrow race instead of none).
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} appeared while it was being written: left it as it is, wrote nothing")
    os.rename(tmp, dst)


# -- signals ---------------------------------------------------------------------------------------


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM (and a default-handled SIGINT) into an exception while the block runs,
    so ``finally`` / ``except BaseException`` clean-ups run; exit status 128 + signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, _raise_exit if sig == signal.SIGTERM else signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the context managers --------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on a clean exit it becomes ``path``.

    On an error (or SIGTERM / SIGINT) inside the block the temporary directory is removed
    and nothing appears at ``path``.
    """
    dst = check_destination(path, overwrite)
    with cleanup_on_signals():
        tmp = _begin(dst, directory=True)
        try:
            yield tmp
            _commit(tmp, dst, overwrite)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write one file to; it replaces ``path``
    on a clean exit (an output file of a run, replaced as an ``open(path, "w")`` would)."""
    dst = check_output_file(path)
    with cleanup_on_signals():
        tmp = _begin(dst, directory=False)
        try:
            yield tmp
            apply_umask(tmp)
            os.replace(tmp, dst)
        except BaseException:
            _remove(tmp)
            raise


def from_rank0(make, group=None):
    """``make()`` on rank 0 of ``group``, its (picklable) result, or its error, on every rank."""
    import torch.distributed as dist

    box: list = [None, None]
    if dist.get_rank(group) == 0:
        try:
            box[0] = make()
        except Exception as e:  # every rank raises it, so none waits for the others
            box[1] = e
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if box[1] is not None:
        raise box[1]
    return box[0]


def shared_temp_dir(near: str | Path, group=None) -> Path:
    """A scratch directory next to ``near``, made by rank 0 and the same path on every rank
    (named as :func:`atomic_directory` names its own, so one left behind is removed by a later
    write to ``near``); the caller removes it."""
    return Path(from_rank0(lambda: str(_begin(Path(os.path.abspath(near)), directory=True)), group))


@contextlib.contextmanager
def shared_atomic_directory(path: str | Path, overwrite: bool = False, group=None) -> Iterator[Path]:
    """:func:`atomic_directory` for every rank of a torch.distributed job (call on all ranks).

    Rank 0 of ``group`` checks the destination and creates the temporary directory, every
    rank gets its path, writes its part, and the ranks agree that all succeeded before
    rank 0 renames. An error on any rank (including rank 0's checks) is raised on every
    rank and nothing is written.
    """
    import torch
    import torch.distributed as dist

    from megatron_lora.parallel.device import device

    rank0 = dist.get_rank(group) == 0
    src = dist.get_global_rank(group, 0) if group is not None else 0
    tmp = Path(from_rank0(lambda: str(_begin(check_destination(path, overwrite), directory=True)), group))
    committed = False
    try:
        with cleanup_on_signals():
            failure: Optional[BaseException] = None
            try:
                yield tmp
            except BaseException as e:
                failure = e
            ok = torch.tensor([0 if failure else 1], device=device())
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
            result: list = [None]
            if rank0 and ok.item():
                try:
                    _commit(tmp, Path(os.path.abspath(path)), overwrite)
                    committed = True
                except Exception as e:
                    result[0] = e
            dist.broadcast_object_list(result, src=src, group=group)
            if failure is not None:
                raise failure
            if not ok.item():
                raise RuntimeError(f"another rank failed while writing {path}: nothing written")
            if result[0] is not None:
                raise result[0]
    finally:
        if rank0 and not committed:
            _remove(tmp)
