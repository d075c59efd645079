"""The durable work log: one JSON line per finished (image, task) result or image failure.

Each data-parallel rank appends to its own file ``<out>.worklog/rank-NNNNN.jsonl``; every write is
flushed and fsynced, so a crash loses at most the batch in flight. A torn last line (the process
died mid-write) is skipped on reading, and the next append starts on a fresh line. Records are
keyed by :func:`work_key` (image content hash, task, prompt, model, parser version): a re-run skips
keys already present in any rank's file, whatever the world size was.

Record fields: ``key``, ``kind`` (``"result"`` | ``"failure"`` | ``"seen"``), ``file_name``,
``image_id``, ``index`` (source order), ``hash``, ``wh`` (width, height), ``task``, ``t`` (unix
time), and ``result`` (see ``sphinx_tools/records.py``) or ``reason``. A ``seen`` record says
that a file name had this content hash when a run skipped it because every result for that
content was already in the log (a renamed or duplicated image): the merge looks results up by
key, from the file name's newest content hash. The merge adds ``image_id`` records
(``file_name``, ``image_id``) and ``category_id`` records (``name``, ``category_id``) the first
time it gives a name an id, so ids stay put across re-runs (see ``coco.py``).

File names are ``str`` that may hold lone surrogates (undecodable bytes of an OS file name kept
with ``surrogateescape``). A record holding one is written with ASCII escapes (``\\udcff``), so
every line stays valid UTF-8 JSON and reads back as the same ``str``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOG_SUFFIX = ".worklog"
LOCK_SUFFIX = ".lock"


def work_key(*parts) -> str:
    "A short stable key from JSON-able parts (order matters)."
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def json_text(value) -> str:
    """``value`` as compact-ish JSON text that is always encodable as UTF-8.

    Non-ASCII text is kept as is, except when ``value`` holds a lone surrogate (a file name with
    undecodable bytes): then everything non-ASCII is escaped, which ``json.loads`` reverses
    exactly.
    """
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True)
    return text


def log_dir_for(out: Path) -> Path:
    "The work-log folder beside an output file: ``labels.json`` -> ``labels.json.worklog/``."
    out = Path(out)
    return out.with_name(out.name + LOG_SUFFIX)


def lock_path_for(out: Path) -> Path:
    "The output lock beside an output file: ``labels.json`` -> ``labels.json.lock``."
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


class OutputBusy(RuntimeError):
    "Another process holds the output lock; the message names it (its pid) and the output."


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``<out>.lock``, held until :meth:`release`.

    The lock file keeps the holder's pid, so a refused job can name the one that holds it. The
    OS drops the lock when the holder dies, however it dies; the file itself stays (removing it
    would race with a job taking it).

    Args:
        out: the output file the lock guards (its folder must exist).

    Raises:
        OutputBusy: from :meth:`acquire`, when another process holds the lock.
        OSError: from :meth:`acquire`, when the lock file cannot be created (a read-only folder).
    """

    def __init__(self, out):
        self.out = Path(out)
        self.path = lock_path_for(self.out)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no lock
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder}" if holder else "another process"
            raise OutputBusy(
                f"another `label` job ({who}) is writing {str(self.out)!r} (it holds "
                f"{str(self.path)!r}); wait for it to finish, or give another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def check_writable(out) -> None:
    """Make sure the output's folder and its work-log folder can be written (creating them).

    Raises:
        OSError: naming the folder or file that cannot be written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = log_dir_for(out)
    folder.mkdir(exist_ok=True)
    for where in (out.parent, folder):
        with tempfile.TemporaryFile(dir=where, prefix=".write-check-"):
            pass
    for path in folder.glob("rank-*.jsonl"):
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


class WorkLog:
    """Append-only JSONL log of one rank, readable together with the other ranks' logs.

    Args:
        folder: the work-log folder (created).
        rank: this writer's data-parallel rank (its file name).
    """

    def __init__(self, folder, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank-{rank:05d}.jsonl"
        self._file = None
        self.torn_lines = 0
        self._latest: dict | None = None

    # -- writing -------------------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        """Write records, one line each, then flush and fsync (durable when this returns).

        Raises:
            OSError: when they cannot be written (a full disk, say); the file is cut back to
                where it was, so no part of them stays in it.
        """
        if not records:
            return
        f = self._open()
        stamp = time.time()
        lines = "".join(json_text({**r, "t": r.get("t", stamp)}) + "\n" for r in records)
        self._latest = None
        start = f.tell()
        try:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            self._abandon(start)
            raise

    def _abandon(self, size: int) -> None:
        "Drop the open file and cut it back to ``size`` bytes (after a failed append)."
        try:
            self._file.close()
        except OSError:
            pass  # the buffered part could not be flushed either; the fd is closed anyway
        self._file = None
        try:
            os.truncate(self.path, size)
        except OSError:
            pass  # a torn last line is skipped on reading and the next append starts afresh

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a+", encoding="utf-8")
            self._file.seek(0, os.SEEK_END)
            if self._file.tell() > 0:
                self._file.seek(self._file.tell() - 1)
                last = self._file.read(1)
                self._file.seek(0, os.SEEK_END)
                if last != "\n":  # a torn record from a crash: start a fresh line
                    self._file.write("\n")
        return self._file

    def close(self) -> None:
        for f in getattr(self, "_readers", {}).values():
            f.close()
        self._readers = {}
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- reading -------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        "Every rank's log file, sorted."
        return sorted(self.folder.glob("rank-*.jsonl"))

    def records(self) -> Iterator[dict]:
        "Every complete record of every rank's file (torn lines skipped and counted)."
        self.torn_lines = 0
        latest: dict = {}
        for path in self.files():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    record = _loads(line)
                    if record is None:
                        self.torn_lines += bool(line.strip())
                        continue
                    _note_latest(latest, record)
                    yield record
        self._latest = {name: digest for name, (_, digest) in latest.items()}

    def entries(self) -> Iterator[tuple[int, int, dict]]:
        "``(file number, byte offset, record)`` of every complete record (see :meth:`read`)."
        self._readers = {}
        self._read_files = self.files()
        latest: dict = {}
        for number, path in enumerate(self._read_files):
            with open(path, "rb") as f:
                offset = 0
                for raw in f:
                    record = _loads(raw.decode("utf-8", errors="replace"))
                    if record is not None:
                        _note_latest(latest, record)
                        yield number, offset, record
                    offset += len(raw)
        self._latest = {name: digest for name, (_, digest) in latest.items()}

    def read(self, number: int, offset: int) -> dict:
        "The record at ``offset`` of file ``number`` (as given by :meth:`entries`)."
        if number not in self._readers:
            self._readers[number] = open(self._read_files[number], "rb")
        f = self._readers[number]
        f.seek(offset)
        return json.loads(f.readline().decode("utf-8"))

    def done_keys(self) -> set[str]:
        "Keys of the results already in the log (failures are retried, so not included)."
        return {r["key"] for r in self.records() if r.get("kind") == "result"}

    def latest(self) -> dict:
        """Per file name, the content hash its newest record gives it (``None`` after a failure).

        Only result and seen records give a hash; reuses the last full pass of :meth:`records`
        or :meth:`entries` when nothing was appended since.
        """
        if self._latest is None:
            for _ in self.records():
                pass
        return self._latest

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def seen_record(item, content_hash: str) -> dict:
    "The record saying that ``item``'s file name had content ``content_hash`` (see above)."
    return {"kind": "seen", "key": work_key("seen", item.file_name, content_hash),
            "file_name": item.file_name, "image_id": item.image_id, "index": item.index,
            "hash": content_hash}


def _note_latest(latest: dict, record: dict) -> None:
    "Keep, per file name, ``(t, hash)`` of its newest record (hash ``None`` for a failure)."
    name, kind = record.get("file_name"), record.get("kind")
    if not isinstance(name, str) or kind not in ("result", "seen", "failure"):
        return
    t = record.get("t", 0.0)
    if name not in latest or t >= latest[name][0]:
        latest[name] = (t, record.get("hash") if kind != "failure" else None)


def _loads(line: str) -> dict | None:
    if not line.endswith("\n"):
        return None  # torn: the writer died before the newline
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "key" in record else None
