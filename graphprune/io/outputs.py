"""Where graphprune writes: never over what the caller gave, never half-written.

Every writer (ONNX files, plan files, report folders, checkpoints, the CLI) goes through one
:class:`Outputs` transaction:

- each target is *claimed* (and may be checked with :meth:`Outputs.check` before long work): a
  claim is refused (:class:`InputError`) when the target is one of the transaction's inputs, lies
  inside one or holds one, when its folder does not exist or cannot be written, and when it
  already exists, unless ``overwrite=True`` or the writer recognises it as something graphprune
  made (``ours``, e.g. an ONNX file whose producer is graphprune, so that running the same command
  again replaces its own output).  A writer whose folders must never replace someone else's
  (report pages) refuses them itself, whatever ``overwrite`` says;
- a claim returns a path in a hidden staging folder beside the target; the writer writes there;
- :meth:`Outputs.commit` moves every staged file into place only after all of them were written
  (if a move fails, the targets already moved are put back as they were), and
  :meth:`Outputs.discard` (any exception inside ``with Outputs(...)``) removes the staging
  folders and leaves every target as it was.

A process that is killed cannot clean up after itself; its staging folders carry its host name and
process id and are removed by the next transaction that stages in the same folder once that
process is gone (folders of other hosts, which may share the file system, are left alone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator

from graphprune.errors import InputError, InternalError

STAGING_PREFIX = ".graphprune-staging-"
_HOST = socket.gethostname().replace("-", "_") or "host"  # staging folders are named <prefix><pid>-<host>-...


def resolved(path: str | os.PathLike) -> str:
    """The absolute path with symlinks resolved, so that two names of one file compare equal."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def overlap(target: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> str | None:
    """The first input that ``target`` is, lies inside, or holds; ``None`` when they are apart."""
    target = resolved(target)
    for given in inputs:
        given = resolved(given)
        if target == given or os.path.commonpath([target, given]) in (target, given):
            return given
    return None


class Outputs:
    """Files and folders written together: claimed up front, staged, moved into place at once."""

    def __init__(self, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> None:
        self.inputs = [resolved(p) for p in inputs]
        self.overwrite = overwrite
        self._staging: dict[str, str] = {}  # target folder -> its staging folder
        self._claims: list[tuple[str, str, bool]] = []  # (staged, target, is a folder)
        self._done = False

    def add_inputs(self, inputs: Iterable[str | os.PathLike]) -> None:
        """More inputs that no claim may touch (a writer joining a caller's transaction)."""
        self.inputs.extend(resolved(p) for p in inputs)

    def check(self, path: str | os.PathLike, *, folder: bool = False, ours: Callable[[str], bool] | None = None) -> str:
        """The absolute target ``path``, refused if it may not be written (see the module doc): what
        a writer calls before long work, so that a bad target is refused before it, not after."""
        target = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            what = "is a file" if os.path.exists(parent) else "does not exist"
            raise InputError(f"cannot write {target}: its folder {parent} {what}")
        given = overlap(target, self.inputs)
        if given is not None:
            real = resolved(target)
            relation = "is" if given == real else "holds" if os.path.commonpath([real, given]) == real else "is inside"
            raise InputError(f"cannot write {target}: it {relation} an input ({given}); name another output")
        for _, claimed, _ in self._claims:
            if claimed == target:
                raise InputError(f"cannot write {target} twice in one run")
        if os.path.lexists(target):
            if os.path.isdir(target) != folder:
                raise InputError(f"cannot write {target}: it is a {'folder' if os.path.isdir(target) else 'file'}")
            empty_folder = folder and not os.listdir(target)
            if not (self.overwrite or empty_folder or (ours is not None and ours(target))):
                raise InputError(
                    f"{target} exists and graphprune did not write it: name another output, or pass "
                    "overwrite=True (--overwrite on the command line) to replace it"
                )
        if parent not in self._staging:  # probe now, so that an unwritable folder is refused before long work
            os.rmdir(self._make_staging(parent))
        return target

    def claim(self, path: str | os.PathLike, *, folder: bool = False, ours: Callable[[str], bool] | None = None) -> str:
        """Check ``path`` and return where to write it: a path in a staging folder beside it (a new
        empty folder when ``folder``)."""
        if self._done:
            raise InputError("this Outputs transaction was already committed or discarded: start a new one")
        target = self.check(path, folder=folder, ours=ours)
        staged = os.path.join(self._stage_in(os.path.dirname(target)), os.path.basename(target))
        if folder:
            os.mkdir(staged)
        self._claims.append((staged, target, folder))
        return staged

    def staged(self, path: str | os.PathLike) -> str:
        """Where the claimed ``path`` is being written (to read a result before :meth:`commit`, e.g.
        to time a model file)."""
        target = os.path.abspath(os.fspath(path))
        for staged, claimed, _ in self._claims:
            if claimed == target:
                return staged
        raise InternalError(f"{target} was not claimed in this transaction")

    def _stage_in(self, parent: str) -> str:
        if parent not in self._staging:
            _remove_abandoned_staging(parent)
            self._staging[parent] = self._make_staging(parent)
        return self._staging[parent]

    @staticmethod
    def _make_staging(parent: str) -> str:
        try:
            return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{_HOST}-", dir=parent)
        except OSError as exc:
            raise InputError(f"cannot write in {parent}: {exc.strerror}") from exc

    def _drop_claims(self, first: int) -> None:
        """Forget the claims from index ``first`` on and remove what was staged for them."""
        for staged, _, _ in self._claims[first:]:
            _remove(staged)
        del self._claims[first:]

    def commit(self) -> list[str]:
        """Move every staged file that exists into place (a claim left unwritten is dropped); returns
        the targets written.  If a move fails, the targets moved so far are restored."""
        written: list[tuple[str, str | None]] = []  # (target, where its former content waits)
        try:
            for staged, target, folder in self._claims:
                if not os.path.lexists(staged) or (folder and not os.listdir(staged)):
                    continue
                former = _set_aside(staged, target, folder)
                try:
                    os.replace(staged, target)
                except BaseException:
                    if folder and former is not None:
                        os.replace(former, target)
                    raise
                written.append((target, former))
        except BaseException:
            for target, former in reversed(written):
                _remove(target)
                if former is not None:
                    os.replace(former, target)
            raise
        finally:
            self.discard()
        return [target for target, _ in written]

    def discard(self) -> None:
        """Remove the staging folders; targets not yet moved stay as they were."""
        self._done = True
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None and not self._done:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def writing(
    outputs: Outputs | None, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[Outputs]:
    """The caller's transaction (committed by the caller), or a new one committed when the block
    ends without an error: how one writer's files join a command that writes several.  If the
    block fails, what it claimed in the caller's transaction is dropped, so that a caller who
    catches the error and commits does not commit a half-written or unverified file."""
    if outputs is not None:
        outputs.add_inputs(inputs)
        mark = len(outputs._claims)
        try:
            yield outputs
        except BaseException:
            outputs._drop_claims(mark)  # a writer that failed leaves nothing for the caller to commit
            raise
        return
    with Outputs(inputs=inputs, overwrite=overwrite) as fresh:
        yield fresh


def _set_aside(staged: str, target: str, folder: bool) -> str | None:
    """Keep what ``target`` holds now in the staging folder (removed with it, or put back if the
    commit fails): a folder is moved there, a file hard-linked (so that the file is replaced in one
    step, never missing); ``None`` when there is nothing to keep or it cannot be kept."""
    if not os.path.lexists(target):
        return None
    former = staged + ".replaced"
    if folder:
        os.replace(target, former)
        return former
    try:
        os.link(target, former, follow_symlinks=False)
    except OSError:  # a file system without hard links: replaced without a way back
        return None
    return former


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _remove_abandoned_staging(parent: str) -> None:
    """Remove staging folders in ``parent`` left by processes of this host that no longer run."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        pid, _, rest = name[len(STAGING_PREFIX) :].partition("-")
        if pid.isdigit() and rest.startswith(f"{_HOST}-") and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


__all__ = ["Outputs", "overlap", "resolved", "writing"]
