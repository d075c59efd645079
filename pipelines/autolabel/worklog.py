"""The durable work log: one JSON line per finished (image, task) result or image failure.

Each data-parallel rank appends to its own file ``<out>.worklog/rank-NNNNN.jsonl``; every write is
flushed and fsynced, so a crash loses at most the batch in flight. A torn last line (the process
died mid-write) is skipped on reading, and the next append starts on a fresh line. Records are
keyed by :func:`work_key` (image content hash, task, prompt, model, parser version): a re-run skips
keys already present in any rank's file, whatever the world size was.

Record fields: ``key``, ``kind`` (``"result"`` | ``"failure"``), ``file_name``, ``image_id``,
``index`` (source order), ``hash``, ``wh`` (width, height), ``task``, ``t`` (unix time), and
``result`` (see ``records.py``) or ``reason``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

LOG_SUFFIX = ".worklog"


def work_key(*parts) -> str:
    "A short stable key from JSON-able parts (order matters)."
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def log_dir_for(out: Path) -> Path:
    "The work-log folder beside an output file: ``labels.json`` -> ``labels.json.worklog/``."
    out = Path(out)
    return out.with_name(out.name + LOG_SUFFIX)


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

    # -- writing -------------------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        "Write records, one line each, then flush and fsync (durable when this returns)."
        if not records:
            return
        f = self._open()
        stamp = time.time()
        lines = "".join(json.dumps({**r, "t": r.get("t", stamp)}, ensure_ascii=False) + "\n"
                        for r in records)
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())

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
        for path in self.files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    record = _loads(line)
                    if record is None:
                        self.torn_lines += bool(line.strip())
                        continue
                    yield record

    def entries(self) -> Iterator[tuple[int, int, dict]]:
        "``(file number, byte offset, record)`` of every complete record (see :meth:`read`)."
        self._readers = {}
        self._read_files = self.files()
        for number, path in enumerate(self._read_files):
            with open(path, "rb") as f:
                offset = 0
                for raw in f:
                    record = _loads(raw.decode("utf-8", errors="replace"))
                    if record is not None:
                        yield number, offset, record
                    offset += len(raw)

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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _loads(line: str) -> dict | None:
    if not line.endswith("\n"):
        return None  # torn: the writer died before the newline
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "key" in record else None
