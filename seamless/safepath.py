"""Making and opening files, as root, at paths a user may have a say in.

The restore makes directories, named pipes and runtime files again for trees that run
as other users, and opens files again for them, in places those users can write to
(/tmp, a service's /run directory). Done by path, root would follow any symbolic link a
user put there since the checkpoint and chown /etc/shadow to them. Here every path is
walked one name at a time from /, each name opened without following it: a symbolic
link is followed only when root owns it (/var/run -> /run), and what is made is opened
by the name just made, checked to be root's own new file, and changed through that
descriptor, never again by name.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator

from seamless import syscalls
from seamless.errors import SeamlessError

#: How many symbolic links one walk follows, as the kernel's own limit (ELOOP).
MAX_LINKS = 40

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(SeamlessError):
    """A path that cannot be used without trusting a user's link or file."""


def _names(path: str) -> list[str]:
    return [n for n in path.split("/") if n and n != "."]


@contextlib.contextmanager
def directory(path: str, make: bool = False) -> Iterator[int]:
    """An O_PATH descriptor of the directory ``path`` (absolute), for ``*at`` calls.
    ``make``: a missing directory on the way is made, root's, mode 0755."""
    if not path.startswith("/"):
        raise UnsafePath(f"{path}: not an absolute path")
    todo = list(reversed(_names(path)))
    stack = [os.open("/", _PATH | os.O_DIRECTORY)]
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            here = stack[-1]
            try:
                fd = os.open(name, _PATH, dir_fd=here)
            except FileNotFoundError:
                if not make:
                    raise UnsafePath(f"{path}: {name} is not there") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=here)
                fd = os.open(name, _PATH, dir_fd=here)
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                try:
                    if st.st_uid != 0:
                        raise UnsafePath(f"{path}: not following {name}, a symbolic link "
                                         f"that user {st.st_uid} owns")
                    links += 1
                    if links > MAX_LINKS:
                        raise UnsafePath(f"{path}: too many symbolic links")
                    target = os.readlink("", dir_fd=fd)
                finally:
                    os.close(fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(reversed(_names(target)))
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise UnsafePath(f"{path}: {name} is not a directory")
            stack.append(fd)
        yield stack[-1]
    finally:
        for fd in stack:
            os.close(fd)


def _split(path: str) -> tuple[str, str]:
    parent, name = os.path.split(path.rstrip("/"))
    if not name or name in (".", ".."):
        raise UnsafePath(f"{path}: names no file")
    return parent, name


def _made(name: str, parent: int, flags: int, kind: int) -> int:
    """Open what was just made as ``name`` in ``parent``, and check that it is still
    root's new file of that kind (not a user's put in its place meanwhile)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid() or st.st_nlink > 2:
        os.close(fd)
        raise UnsafePath(f"{name} was replaced while it was made")
    return fd


def _make(path: str, uid: int, gid: int, mode: int, kind: int,
          create: Callable[[str, int], None], flags: int, parents: bool) -> bool:
    """Make ``path`` unless something is there (False), its missing parents too with
    ``parents``; then give it ``uid``:``gid`` and ``mode`` through a descriptor."""
    where, name = _split(path)
    with directory(where, make=parents) as parent:
        try:
            create(name, parent)
        except FileExistsError:
            return False
        fd = _made(name, parent, flags, kind)
    try:
        if kind == stat.S_IFLNK:
            syscalls.chown_fd(fd, uid, gid)
        else:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def make_dir(path: str, uid: int, gid: int, mode: int, parents: bool = True) -> bool:
    """Make the directory ``path`` with that owner and mode; False when something is
    there already (left as it is)."""
    return _make(path, uid, gid, mode, stat.S_IFDIR,
                 lambda name, parent: os.mkdir(name, 0o700, dir_fd=parent),
                 os.O_RDONLY | os.O_DIRECTORY, parents)


def make_fifo(path: str, uid: int, gid: int, mode: int, parents: bool = True) -> bool:
    """Make the named pipe ``path`` with that owner and mode (False: something is there)."""
    return _make(path, uid, gid, mode, stat.S_IFIFO,
                 lambda name, parent: os.mkfifo(name, 0o600, dir_fd=parent),
                 os.O_RDWR | os.O_NONBLOCK, parents)


def make_symlink(path: str, target: str, uid: int, gid: int, parents: bool = True) -> bool:
    """Make the symbolic link ``path`` -> ``target``, owned by ``uid``:``gid``."""
    return _make(path, uid, gid, 0, stat.S_IFLNK,
                 lambda name, parent: os.symlink(target, name, dir_fd=parent), os.O_PATH,
                 parents)


def make_file(path: str, data: bytes, uid: int, gid: int, mode: int,
              parents: bool = True) -> bool:
    """Make the regular file ``path`` holding ``data`` (False: something is there)."""
    where, name = _split(path)
    with directory(where, make=parents) as parent:
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent)
        except FileExistsError:
            return False
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def open_file(path: str, flags: int) -> int:
    """Open an existing ``path`` with ``flags``, following no link a user owns."""
    where, name = _split(path)
    with directory(where) as parent:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
