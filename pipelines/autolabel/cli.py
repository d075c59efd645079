"""``sphinx-tools label``, ``export`` and ``evaluate``: the only code here that prints."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

FORMATS = ("coco", "yolo", "voc", "label-studio")


def parse_task_options(values) -> dict:
    """``["detection.classes=[\\"cat\\"]", "vqa.question=Is it day?"]`` -> nested options.

    Values are read as JSON when they parse, else kept as strings.

    Raises:
        click.BadParameter: naming a value without ``task.key=``.
    """
    options: dict = {}
    for value in values:
        target, sep, raw = value.partition("=")
        task, dot, key = target.partition(".")
        if not sep or not dot or not task or not key:
            raise click.BadParameter(f"expected TASK.KEY=VALUE, got {value!r}",
                                     param_hint="--option")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        options.setdefault(task.strip(), {})[key.strip()] = parsed
    return options


def parse_formats(values) -> list[str]:
    """``("yolo,voc", "coco")`` -> ``["yolo", "voc", "coco"]`` (unique, in order).

    Raises:
        click.BadParameter: naming an unknown format and the known ones.
    """
    names = [name for value in values for name in _split_list(value, "--format")]
    for name in names:
        if name not in FORMATS:
            raise click.BadParameter(f"unknown format {name!r}; use one of {', '.join(FORMATS)}",
                                     param_hint="--format")
    return list(dict.fromkeys(names))


def _split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter(f"expected a comma-separated list, got {text!r}", param_hint=what)
    return items


def _distributed(model_parallel: int):
    "Join torchrun's world when launched by it (or MP > 1): ``(rank, dp_rank, dp_world, writer)``."
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and model_parallel <= 1:
        return 0, 0, 1, True, None
    import torch.distributed as tdist

    from sphinx_tools import dist

    dist.maybe_init_dist()
    dist.init_model_parallel(model_parallel)
    return (tdist.get_rank(), dist.dp_rank(), dist.dp_world_size(), dist.mp_rank() == 0,
            tdist.barrier)


def _load_sam(checkpoint: Path, model_type: str, device: str):
    from sphinx_tools.cli import _device
    from sphinx_tools.pipelines.segment import load_sam

    return load_sam(checkpoint, model_type, _device(device))


def _sam_id(checkpoint: Path | None, model_type: str) -> str | None:
    if checkpoint is None:
        return None
    return f"{model_type}:{Path(checkpoint).name}:{Path(checkpoint).stat().st_size}"


def _box_filter_options(command):
    "``--min-score``, ``--nms`` and ``--nms-class-agnostic``, shared by ``label`` and ``export``."
    for option in reversed([
        click.option("--min-score", type=click.FloatRange(0, 1),
                     help="drop boxes scored below this [default: off]"),
        click.option("--nms", type=click.FloatRange(0, 1), metavar="IOU",
                     help="per task and class, drop the lower-scored of two boxes overlapping "
                          "more than IOU [default: off]"),
        click.option("--nms-class-agnostic", is_flag=True,
                     help="NMS across classes (within a task)"),
    ]):
        command = option(command)
    return command


@click.command(name="label")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", "-c", default="demo", show_default=True, type=click.Path(path_type=Path),
              help="SPHINX checkpoint folder, or `demo` for the embedded demo model")
@click.option("--tasks", "-t", default="detection", show_default=True,
              help="comma-separated tasks, e.g. detection,pose,ocr,caption,layout")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the COCO file to write; the work log goes beside it (<out>.worklog/)")
@click.option("--ontology", "--classes", "ontology",
              help="classes with synonyms: 'person=man|woman,car' or a JSON/YAML file")
@click.option("--categories", "categories_file",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a COCO file whose categories (names and ids) the output uses, e.g. the "
                   "ground truth, so that a plain COCOeval against it is right")
@click.option("--drop-unmapped", is_flag=True, help="drop phrases no class matches")
@click.option("--option", "task_option", multiple=True, metavar="TASK.KEY=VALUE",
              help="a task option (VALUE as JSON or text), e.g. vqa.question='Is it day?'")
@click.option("--format", "formats", multiple=True, default=("coco",), show_default=True,
              metavar="FORMATS",
              help="exports beside the COCO file, comma-separated or repeated: "
                   "coco,yolo,voc,label-studio (as `sphinx-tools export` writes them)")
@_box_filter_options
@click.option("--sam", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SAM checkpoint: add masks to box annotations")
@click.option("--mask-format", default="rle", show_default=True, type=click.Choice(["rle", "polygon"]),
              help="SAM masks in the COCO file: compressed RLE (exact) or polygons (outer contours)")
@click.option("--sam-type", default="vit_h", show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--max-gen-len", type=click.IntRange(1),
              help="generation budget of every question [default: each task's own]")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--top-p", default=0.95, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit", type=click.IntRange(0), help="label only the first N images")
@click.option("--dry-run", is_flag=True, help="list the work to do and exit")
@click.option("--overwrite", is_flag=True, help="redo work that is already in the log")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
@click.option("--dtype", default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]),
              help="store the LLM's linear weights as int8 (weight-only; needs torchao)")
@click.option("--model-parallel", default=1, show_default=True, type=click.IntRange(1),
              help="model-parallel size under torchrun (the rest of the world is data parallel)")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="folder the file names of a COCO / RefCOCO source are relative to")
@click.option("--allow-outside-root", is_flag=True,
              help="read COCO / RefCOCO file names that are absolute or climb out of the image "
                   "root with '..' (refused unless given)")
@click.option("--allow-failures", is_flag=True,
              help="exit 0 even when some images failed (by default any failed image, of this "
                   "run or recorded in the work log, makes the exit status 1)")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="image-reading threads")
@click.option("--max-pixels", default=89_478_485, show_default=True, type=click.IntRange(1),
              help="larger images are recorded as failures (decompression bombs)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def label_command(src, checkpoint, tasks, out, ontology, categories_file, drop_unmapped,
                  task_option, formats, min_score, nms, nms_class_agnostic, sam, mask_format,
                  sam_type, batch_size, max_gen_len, temperature, top_p, seed, limit, dry_run,
                  overwrite, device, dtype, quantize, model_parallel, image_root,
                  allow_outside_root, allow_failures, workers, max_pixels, progress):
    """Auto-label images (a folder, a list of paths, or a COCO / RefCOCO json) into ONE COCO file.

    \b
    Examples:
      sphinx-tools label examples/images --tasks detection,pose --out labels.json
      sphinx-tools label images/ -c /ckpt/SPHINX-v2-1k --dtype bf16 --tasks detection,ocr \\
          --categories gt.json --nms 0.6 --format yolo,label-studio --out labels.json

    Resumable: results go to a durable work log first, and a re-run skips what is done.
    Multi-GPU: launch with torchrun (``--model-parallel N``); rank 0 merges.
    One job at a time per --out: a second one is refused while the first holds <out>.lock.

    Exit status: 0 when every image was labeled; 1 when any image failed (in this run or as
    recorded in the work log; they are listed under 'failures' in the COCO file) unless
    --allow-failures is given, when an export failed, or when no image could be labeled.
    """
    from .engine import Labeler, model_fingerprint
    from .filters import AnnotationFilter
    from .sources import open_source, read_categories

    try:
        formats = parse_formats(formats)
        source = open_source(src, image_root, allow_outside_root=allow_outside_root)
        given = None if categories_file is None else read_categories(categories_file)
        onto = _ontology(ontology, drop_unmapped, source, given)
        flt = AnnotationFilter(min_score=min_score, nms=nms, class_agnostic=nms_class_agnostic)
        names = _split_list(tasks, "--tasks")
        options = parse_task_options(task_option)
        from sphinx_tools.checkpoint import read_task_options, resolve

        checkpoint = resolve(checkpoint)  # `demo` -> the embedded demo model
        if not checkpoint.is_dir():
            raise click.BadParameter(f"checkpoint folder {str(checkpoint)!r} does not exist",
                                     param_hint="--checkpoint")
        common = dict(task_options=options, trained_options=read_task_options(checkpoint),
                      ontology=onto, max_gen_len=max_gen_len,
                      temperature=temperature, top_p=top_p, seed=seed,
                      model_id=model_fingerprint(checkpoint), sam_id=_sam_id(sam, sam_type))
        if dry_run:
            labeler = Labeler(None, names, **common)
            labeler.sam_predictor = sam  # only for `uses_sam` in the listing
            return _dry_run(labeler, source, out, limit, overwrite)
        labeler = Labeler(None, names, **common)  # validates options before loading anything
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    lock = _claim_output(out)  # before the model loads: a busy or unwritable --out fails at once
    try:
        rank, dp_rank, dp_world, writer, barrier = _distributed(model_parallel)
        labeler.model = _load_model(checkpoint, device, dtype, model_parallel, quantize=quantize)
        if sam is not None:
            labeler.sam_predictor = _load_sam(sam, sam_type, device)
        try:
            summary = _label(labeler, source, out, batch_size, limit, overwrite, dp_rank,
                             dp_world, writer, progress and writer, workers, max_pixels, barrier)
        except OSError as exc:
            from .worklog import log_dir_for

            raise click.ClickException(_write_error(
                exc, f"the work log {str(log_dir_for(out))!r}", "the images finished before are "
                "kept in it, and a re-run resumes from them")) from None
        if barrier is not None:
            barrier()
        if rank != 0:
            return
        _finish(labeler, source, out, limit, formats, summary, dp_world, mask_format,
                allow_failures, given, flt)
    finally:
        if lock is not None:
            lock.release()


def _claim_output(out: Path):
    """Check that ``out``'s folders can be written; on the first rank, take the output lock and
    remove what killed merges left beside ``out``. Returns the lock (``None`` on other ranks).

    Raises:
        click.ClickException: naming the other job, or the folder that cannot be written.
    """
    from .coco import remove_debris
    from .worklog import OutputBusy, OutputLock, check_writable

    try:
        check_writable(out)
        if int(os.environ.get("RANK", "0")) != 0:
            return None
        lock = OutputLock(out).acquire()
    except OutputBusy as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(_write_error(exc, f"the output folder of {str(out)!r}",
                                                "nothing was labeled")) from None
    for path in remove_debris(out):
        click.echo(f"removed {path.name}, left by an interrupted merge", err=True)
    return lock


def _write_error(exc: OSError, what: str, consequence: str) -> str:
    "One clear line for an ``OSError`` met while writing ``what``."
    where = f" ({_shown(os.fsdecode(exc.filename))})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full (no space left on device)"
    else:
        reason = exc.strerror or str(exc)
    return f"cannot write {what}{where}: {reason}; {consequence}"


def _shown(name: str) -> str:
    "A file name for a message: undecodable bytes (lone surrogates) shown as ``\\xNN``."
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ontology(spec, drop_unmapped: bool, source, categories=None):
    from .ontology import Ontology

    if spec:
        return Ontology.parse(spec, keep_unmapped=not drop_unmapped)
    if categories or source.categories:
        return Ontology.from_categories(categories or source.categories,
                                        keep_unmapped=not drop_unmapped)
    return None if not drop_unmapped else Ontology([], keep_unmapped=False)


def _load_model(checkpoint, device, dtype, model_parallel, quantize=None):
    from sphinx_tools.cli import _device, _dtype
    from sphinx_tools.sphinx_model import SphinxModel

    return SphinxModel.from_pretrained(checkpoint, device=_device(device), dtype=_dtype(dtype),
                                       mp_group=model_parallel, quantize=quantize)


def _label(labeler, source, out, batch_size, limit, overwrite, dp_rank, dp_world, writer,
           progress, workers, max_pixels, barrier):
    from .run import label_dataset

    return label_dataset(labeler, source, out, batch_size=batch_size, limit=limit,
                         overwrite=overwrite, rank=dp_rank, world=dp_world, write=writer,
                         progress=progress, workers=workers, max_pixels=max_pixels,
                         barrier=barrier)


def _finish(labeler, source, out, limit, formats, summary, dp_world, mask_format="rle",
            allow_failures=False, categories=None, annotation_filter=None) -> None:
    """Rank 0: merge the logs into the COCO file, export, print the summary, set the exit code.

    Each export runs on its own: one that fails is reported in one line and the others still
    run. The exit status is 1 when an export failed, when no image was labeled, or when any image
    failed or is missing (unless ``allow_failures``).
    """
    from .coco import write_coco

    try:
        merged = write_coco(out, source, labeler, limit=limit,
                            metadata={"data_parallel": dp_world}, mask_format=mask_format,
                            categories=categories, annotation_filter=annotation_filter)
    except OSError as exc:
        raise click.ClickException(_write_error(
            exc, str(out), f"the previous {out.name} (if any) is unchanged, and the labels are "
            "kept in the work log: re-run to write it")) from None
    failed_exports = run_exports(out, [f for f in formats if f != "coco"],
                                 images_root=source.root)
    _print_summary(summary, merged, out)
    failures, missing = merged.counts.get("failures", 0), merged.missing
    status = 0
    if merged.counts.get("images", 0) == 0 and (failures or missing):
        status = 1
    elif (failures or missing or summary.failed) and not allow_failures:
        click.echo(f"exit status 1: {failures} image(s) failed"
                   + (f" and {missing} not labeled" if missing else "")
                   + f" (see 'failures' in {out}); --allow-failures exits 0", err=True)
        status = 1
    if failed_exports:
        click.echo(f"exit status 1: export failed: {', '.join(failed_exports)}", err=True)
        status = 1
    if status:
        sys.exit(status)


def run_exports(coco_path, formats, out_dir=None, **options) -> list[str]:
    """Export ``coco_path`` to each format (see :func:`.export.export`), one line each; returns
    the formats that failed. One format that fails does not stop the others."""
    from . import export as export_module

    failed = []
    for fmt in formats:
        out = None if out_dir is None else export_module.default_path(coco_path, fmt, out_dir)
        try:
            where = export_module.export(coco_path, fmt, out=out, **options)
        except Exception as exc:  # one format must not cost the others (or the summary)
            failed.append(fmt)
            click.echo(f"export {fmt} failed: {type(exc).__name__}: {exc}", err=True)
            continue
        notes = []
        if where.fallbacks:
            notes.append(f"{where.fallbacks} masks written as their boxes")
        if where.missing_images:
            notes.append(f"{where.missing_images} images not found: give --images")
        notes += [f"{n} dropped by --{reason.replace('_', '-')}"
                  for reason, n in (where.dropped or {}).items() if n]
        click.echo(f"exported {fmt} to {where.path}"
                   + (f" ({'; '.join(notes)})" if notes else ""), err=True)
    return failed


def _print_summary(summary, merged, out) -> None:
    c = merged.counts
    click.echo(
        f"wrote {out}: {c.get('images', 0)} images, {c.get('annotations', 0)} annotations, "
        f"{c.get('captions', 0)} captions, {c.get('relations', 0)} relations, "
        f"{c.get('failures', 0)} failures"
        + (f", {merged.missing} not labeled" if merged.missing else ""), err=True)
    if merged.dropped:
        click.echo(f"dropped {merged.dropped.get('min_score', 0)} boxes below --min-score and "
                   f"{merged.dropped.get('nms', 0)} by --nms", err=True)
    click.echo(f"this run: {summary.labeled} labeled, {summary.skipped} already done, "
               f"{len(summary.failed)} failed in {summary.seconds:.1f}s "
               f"({summary.images_per_s:.2f} images/s)", err=True)
    for name, reason in summary.failed[:20]:
        click.echo(f"  failed: {_shown(name)}: {reason}", err=True)
    if len(summary.failed) > 20:
        click.echo(f"  ... and {len(summary.failed) - 20} more (see 'failures' in {out})",
                   err=True)


def _dry_run(labeler, source, out, limit, overwrite) -> None:
    "List the work: per task, how many images still need it; then the first pending images."
    from .run import load_work, shard_items
    from .worklog import WorkLog, log_dir_for

    folder = log_dir_for(out)
    done = set() if overwrite or not folder.exists() else WorkLog(folder).done_keys()
    todo: dict[str, int] = {}
    images = unreadable = 0
    shown = []
    for item in shard_items(source, limit):
        images += 1
        work = load_work(item, labeler, done, overwrite, max_pixels=sys.maxsize)
        if work.hash is None:
            unreadable += 1
            continue
        for task in work.pending:
            todo[task] = todo.get(task, 0) + 1
        if work.pending and len(shown) < 20:
            shown.append(f"  {_shown(item.file_name)}: {', '.join(work.pending)}")
    click.echo(f"{images} images in {source.location} ({source.kind}); "
               f"{unreadable} unreadable; tasks: {', '.join(labeler.names)}")
    for task in labeler.work_names:
        click.echo(f"  {task}: {todo.get(task, 0)} to do, {images - unreadable - todo.get(task, 0)}"
                   " done")
    click.echo("\n".join(shown) or "nothing to do")


@click.command(name="evaluate")
@click.argument("pred", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("gt", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("json_out", "--json", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the metrics as JSON")
@click.option("--iou-types", default="bbox,segm,keypoints", show_default=True,
              help="COCO metrics to try (each runs when both files have the data)")
@click.option("--rec-iou", default=0.5, show_default=True, type=click.FloatRange(0, 1))
def evaluate_command(pred, gt, json_out, iou_types, rec_iou):
    """Score predictions against ground truth: COCOeval bbox / segm / keypoints, or REC
    Acc@IoU (RefCOCO-style GT). Categories are matched by name, images by file name."""
    from .evaluate import evaluate, format_table

    try:
        metrics = evaluate(pred, gt, iou_types=_split_list(iou_types, "--iou-types"),
                           rec_iou=rec_iou)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_table(metrics))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(metrics, indent=2))


@click.command(name="export")
@click.argument("labels", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "formats", multiple=True, default=("yolo",), show_default=True,
              metavar="FORMATS", help="comma-separated or repeated: coco,yolo,voc,label-studio")
@click.option("--out", "-o", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="folder to write: yolo/, voc/, label-studio.json (+ .xml config), coco.json")
@click.option("--tasks", "-t", "task_filter",
              help="keep only these tasks' annotations, e.g. detection,pose [default: all]")
@click.option("--images", "images_root", type=click.Path(file_okay=False, path_type=Path),
              help="folder the file names are relative to [default: the labeled folder "
                   "recorded in the file, else the file's folder]")
@click.option("--image-mode", default="symlink", show_default=True,
              type=click.Choice(["symlink", "copy", "hardlink", "none"]),
              help="YOLO: how images go into images/{train,val}")
@click.option("--image-url-prefix",
              help="Label Studio: data.image is this + the file name (e.g. "
                   "'/data/local-files/?d=images/' or 'https://host/images/') [default: the "
                   "local-files form of the absolute path]")
@click.option("--split", type=click.FloatRange(0, 1, min_open=True),
              help="YOLO: fraction of images in train, the rest in val [default: all in train, "
                   "val names the same folder]")
@click.option("--seed", default=0, show_default=True, type=int, help="YOLO: which images go to val")
@click.option("--simplify", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Label Studio: polygon tolerance in pixels (0 keeps every point)")
@click.option("--min-polygon-area", default=16.0, show_default=True, type=click.FloatRange(0),
              help="Label Studio: mask parts smaller than this many pixels are left out")
@_box_filter_options
def export_command(labels, formats, out_dir, task_filter, images_root, image_mode,
                   image_url_prefix, split, seed, simplify, min_polygon_area, min_score, nms,
                   nms_class_agnostic):
    """Export a COCO labels file (from `label`, or any other) to YOLO, Pascal VOC, Label Studio
    or a filtered COCO file. No model is loaded.

    \b
    Examples:
      sphinx-tools export labels.json --format yolo,label-studio --out export/ --split 0.8
      sphinx-tools export labels.json --format voc --tasks detection --min-score 0.3 --out voc/

    Exit status 1 when any format failed (the others are still written).
    """
    try:
        names = parse_formats(formats)
        tasks = None if task_filter is None else _split_list(task_filter, "--tasks")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    failed = run_exports(labels, names, out_dir, images_root=images_root, tasks=tasks,
                         min_score=min_score, nms=nms, nms_class_agnostic=nms_class_agnostic,
                         image_url_prefix=image_url_prefix, split=split, seed=seed,
                         image_mode=image_mode, simplify=simplify,
                         min_polygon_area=min_polygon_area)
    if failed:
        click.echo(f"exit status 1: export failed: {', '.join(failed)}", err=True)
        sys.exit(1)
