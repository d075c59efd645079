"""The labeling loop: stream a source's shard, skip finished work, label in batches, log durably.

Images are read and hashed in background threads (a bounded prefetch window), and each decoded
image is reduced at once to what labeling needs (:meth:`Labeler.hold`), so memory stays flat
whatever the image sizes; an image whose every task is already in the work log is skipped without
being decoded.
Under data parallelism each rank takes the items whose index is ``rank`` modulo the world size
and writes its own log; :func:`sphinx_tools.pipelines.autolabel.coco.write_coco` merges them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .engine import MASKED_TASKS, Labeler, Work, failure_record
from .sources import DEFAULT_MAX_PIXELS, ImageError, ImageItem, Source, content_hash, decode_image
from .sources import read_bytes
from .worklog import WorkLog, log_dir_for, seen_record

DECODE_BUDGET_PX = 48_000_000  # two 24 MP photos decode side by side; larger ones one at a time


@dataclass
class RunSummary:
    """What one rank did.

    Attributes:
        images: images in this rank's shard (after ``limit``).
        labeled: images labeled now.
        skipped: images whose every task was already in the log.
        failed: images that could not be labeled, as ``(file_name, reason)``.
        seconds: wall time of the loop.
        sections: seconds per engine section (generate, parse, segment) plus load and write.
    """

    images: int = 0
    labeled: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    sections: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


def shard_items(source: Source, limit: int | None = None, rank: int = 0,
                world: int = 1) -> Iterator[ImageItem]:
    "This rank's items: the first ``limit`` of the source, every ``world``-th from ``rank``."
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    items = source.items()
    if limit is not None:
        items = itertools.islice(items, limit)
    return (item for item in items if item.index % world == rank)


def load_work(item: ImageItem, labeler: Labeler, done, overwrite: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS,
              logged: Callable[[str], dict | None] | None = None,
              budget: PixelBudget | None = None) -> Work:
    """Read and hash one image, find its pending tasks, and decode it only if there are any.

    The decoded image is handed to :meth:`Labeler.hold`, which keeps only what labeling needs.

    Args:
        done: the finished work keys (any container).
        logged: the logged record of a finished key, or ``None`` when it cannot be read. When
            given, the mask stage gets the logged boxes of finished tasks (``Work.logged``); a
            task whose record cannot be read is run again. Without it, only the pending work is
            listed.
        budget: shared between reading threads: the full-size pixels decoded at once.
    """
    try:
        data = read_bytes(item.path)
    except ImageError as exc:
        return Work(item, error=str(exc))
    digest = content_hash(data)
    keys = labeler.keys(digest, item)
    pending = [t for t, k in keys.items() if overwrite or k not in done]
    work = Work(item, hash=digest, keys=keys, pending=pending)
    if pending:
        with budget(_pixels(data)) if budget is not None else nullcontext():
            try:
                image = decode_image(data, max_pixels)
            except ImageError as exc:
                work.error = str(exc)
                return work
            del data
            try:
                labeler.hold(work, image)
            except Exception as exc:  # e.g. the model's preprocessing refuses this image
                work.error = f"cannot prepare the image: {exc!r}"
                return work
            del image
        if logged is not None:
            for task in labeler.mask_inputs(pending):
                record = logged(keys[task])
                if record is not None:
                    work.logged[task] = record["result"]
            redo = set(labeler.mask_inputs(pending)) - set(work.logged)
            work.pending = [t for t in keys if t in pending or t in redo]
    return work


class PixelBudget:
    """Lets reading threads decode images while the full-size pixels in flight stay within
    ``pixels``; an image larger than the whole budget is decoded alone."""

    def __init__(self, pixels: int = DECODE_BUDGET_PX):
        if pixels < 1:
            raise ValueError(f"the pixel budget must be >= 1, got {pixels}")
        self.pixels = int(pixels)
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def __call__(self, pixels: int):
        n = max(0, min(int(pixels), self.pixels))
        with self._cond:
            self._cond.wait_for(lambda: self.used + n <= self.pixels)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _pixels(data: bytes) -> int:
    "The pixel count an image file's header gives (0 when unreadable: decoding will say why)."
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
    except Exception:
        return 0
    return w * h


def finished_work(log: WorkLog, labeler: Labeler) -> dict:
    """``{key: where}`` of the results in the log (failures are retried, so not included).

    With SAM, ``where`` is ``(file number, offset)`` of each box result the mask stage may need
    (see :meth:`WorkLog.read`), else ``None``.
    """
    if not labeler.uses_sam:
        return dict.fromkeys(log.done_keys())
    return {r["key"]: (number, offset) if r.get("task") in MASKED_TASKS else None
            for number, offset, r in log.entries() if r.get("kind") == "result"}


def log_reader(log: WorkLog, done: dict) -> Callable[[str], dict | None]:
    "``key -> logged record`` (``None`` when not found or unreadable), safe across threads."
    lock = threading.Lock()

    def read(key: str) -> dict | None:
        where = done.get(key)
        if where is None:
            return None
        with lock:
            try:
                return log.read(*where)
            except (OSError, ValueError, IndexError):
                return None

    return read


def prefetch(fn: Callable, items, workers: int, window: int) -> Iterator:
    "``map(fn, items)`` on a thread pool, in order, with at most ``window`` items in flight."
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue: deque = deque()
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) >= window:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()


def batched(iterable, n: int) -> Iterator[list]:
    it = iter(iterable)
    while batch := list(itertools.islice(it, n)):
        yield batch


def label_dataset(labeler: Labeler, source: Source, out, *, batch_size: int = 8,
                  limit: int | None = None, overwrite: bool = False, rank: int = 0,
                  world: int = 1, write: bool = True, progress: bool = True, workers: int = 2,
                  max_pixels: int = DEFAULT_MAX_PIXELS,
                  decode_pixels: int = DECODE_BUDGET_PX,
                  barrier: Callable[[], None] | None = None) -> RunSummary:
    """Label this rank's shard of ``source`` into the work log beside ``out``.

    Args:
        labeler: the engine (model, tasks, options).
        source: what to label.
        out: the COCO output path; the log is ``<out>.worklog/``.
        batch_size: images per ``generate_multi`` call.
        limit: label only the first ``limit`` images of the source.
        overwrite: redo work that is already logged.
        rank, world: this data-parallel rank and the number of ranks.
        write: append to the log (false on model-parallel ranks other than 0).
        progress: show a tqdm bar (images/s, ETA, failures).
        workers: image-reading threads.
        max_pixels: larger images are failures (decompression bombs).
        decode_pixels: full-size pixels the reading threads decode at once (each decoded image
            is then reduced to what labeling needs, see :meth:`Labeler.hold`).
        barrier: called once every rank has read the log and before any writes.

    Returns:
        A :class:`RunSummary`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    log = WorkLog(log_dir_for(out), rank)
    done = {} if overwrite else finished_work(log, labeler)
    known = log.latest() if write and not overwrite else {}  # file name -> its logged hash
    if barrier is not None:
        barrier()
    summary = RunSummary()
    bar = _progress(source, limit, rank, world, progress)
    t0 = time.perf_counter()
    items = shard_items(source, limit, rank, world)
    logged, budget = log_reader(log, done), PixelBudget(decode_pixels)
    loaded = prefetch(lambda it: load_work(it, labeler, done, overwrite, max_pixels, logged,
                                           budget),
                      items, workers, window=2 * batch_size + workers)
    try:
        for batch in batched(_ticking(_timed(loaded, labeler.timer), bar), batch_size):
            # images that need the model tick as each one's labels are done
            records = _label_batch(labeler, batch, summary, known, lambda _: bar.update(1))
            if write:
                with labeler.timer("write"):
                    log.append(records)
            bar.set_postfix(failed=len(summary.failed), refresh=False)
    finally:
        log.close()
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.sections = dict(labeler.timer.seconds)
    return summary


def _label_batch(labeler: Labeler, batch: list[Work], summary: RunSummary,
                 known: dict | None = None,
                 on_image: Callable[[Work], None] | None = None) -> list[dict]:
    """Label the pending images of a batch; unreadable images and model failures become records.

    ``on_image(work)`` is called once per image given to the model, as soon as it is done (see
    :meth:`Labeler.label`).

    An image with nothing pending gets a ``seen`` record (its file name and content hash) unless
    ``known`` (file name -> the hash the log last gave it) already says so: that is how the merge
    finds the results of a renamed or duplicated image, which were logged under another name.
    """
    known = {} if known is None else known
    summary.images += len(batch)
    unreadable = [failure_record(w.item, w.error, w.hash) for w in batch if w.error is not None]
    todo = [w for w in batch if w.error is None and w.pending]
    skipped = [w for w in batch if w.error is None and not w.pending]
    summary.skipped += len(skipped)
    seen = []
    for w in skipped:
        if known.get(w.item.file_name) != w.hash:
            seen.append(seen_record(w.item, w.hash))
            known[w.item.file_name] = w.hash
    labeled = labeler.label(todo, on_image) if todo else []
    records = unreadable + labeled
    failed = [(r["file_name"], r["reason"]) for r in records if r["kind"] == "failure"]
    summary.failed += failed
    summary.labeled += len(todo) - (len(failed) - len(unreadable))
    return records + seen


def _needs_model(work: Work) -> bool:
    return work.error is None and bool(work.pending)


def _ticking(works, bar) -> Iterator:
    "Count an image on the bar as soon as it is read when it needs no model (done, or unreadable)."
    for work in works:
        if not _needs_model(work):
            bar.update(1)
        yield work


def _timed(iterator, timer) -> Iterator:
    "Time spent waiting for loaded images (reading and decoding not hidden by the prefetch)."
    it = iter(iterator)
    while True:
        with timer("load"):
            try:
                value = next(it)
            except StopIteration:
                return
        yield value


def _progress(source: Source, limit, rank: int, world: int, enabled: bool):
    from tqdm import tqdm

    total = None
    if enabled:
        n = source.count()
        n = min(n, limit) if limit is not None else n
        total = len(range(rank, n, world))
    return tqdm(total=total, disable=not enabled, unit="img", desc=f"label[{rank}]",
                dynamic_ncols=True)
