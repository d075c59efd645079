"""`sphinx-tools` command line. The only place that prints and turns errors into exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import SphinxToolsError


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise click.BadParameter(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def _device(name: str) -> str:
    "``auto``: ``cuda`` when a GPU is present, else ``cpu``; any other name passes through."
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda, cuda:N"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SphinxToolsError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.version_option(package_name="sphinx-tools")
def main():
    "SPHINX multi-modal LLMs as vision tooling: boxes, masks, keypoints, text, relations, captions."


@main.command("make-tiny")
@click.argument("dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--variant", default="sphinx-1k", show_default=True,
              type=click.Choice(["sphinx-1k", "sphinx-v2-1k", "sphinx", "sphinx-tiny",
                                 "sphinx-tiny-1k", "sphinx-moe", "sphinx-moe-1k"]))
@click.option("--mp", default=1, show_default=True, type=click.IntRange(1, 64),
              help="number of model-parallel shards to write")
@click.option("--seed", default=0, show_default=True, type=int)
def make_tiny(dir, variant, mp, seed):
    "Write a tiny random-weight checkpoint in the released format (for tests and demos)."
    from .tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(dir, variant=variant, mp=mp, seed=seed)
    click.echo(f"wrote tiny {variant} checkpoint (mp={mp}) to {out}")


@main.command()
@click.option("--checkpoint", "-c", default="demo", show_default=True,
              type=click.Path(path_type=Path),
              help="checkpoint folder (consolidated.NN-of-MM.model.pth, tokenizer.model, ...), or "
                   "`demo` for the embedded demo model")
@click.option("--image", "-i", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("question")
@click.option("--max-gen-len", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--dtype", default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]),
              help="store the LLM's linear weights as int8 (weight-only; needs torchao)")
@click.option("--stream/--no-stream", default=True, show_default=True)
def ask(checkpoint, image, question, max_gen_len, temperature, top_p, seed, device, dtype, quantize,
        stream):
    """Ask SPHINX one question about an image and print the answer.

    \b
    Examples:
      sphinx-tools ask -i examples/images/000000.png "What is in the image?"
      sphinx-tools ask -c /ckpt/SPHINX-v2-1k --dtype bf16 -i cat.jpg "Describe it."
    """
    from PIL import Image

    from . import dist
    from .conversation import build_prompt
    from .sphinx_model import SphinxModel

    model = SphinxModel.from_pretrained(checkpoint, device=_device(device), dtype=_dtype(dtype),
                                        quantize=quantize)
    img = None
    if image is not None:
        try:
            img = Image.open(image)
            img.load()
        except OSError as e:
            raise click.ClickException(f"cannot read image {image}: {e}") from None
    prompt = build_prompt([[question, None]])
    kw = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, seed=seed)
    if stream:
        shown = ""
        for text in model.stream(prompt, img, **kw):
            if text.startswith(shown):
                dist.print0(text[len(shown):], end="", flush=True)
            shown = text
        dist.print0()
    else:
        dist.print0(model.generate([prompt], [img], **kw)[0].text.strip())


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(1), help="override the config's step count")
@click.option("--threads", type=click.IntRange(1), help="CPU math threads (per process)")
@click.option("--procs", default=1, show_default=True, type=click.IntRange(1),
              help="local processes, data parallel (torchrun without torchrun); one per GPU on a GPU machine")
@click.option("--device", help="override the config's device: auto (each process's GPU, else CPU), cpu, cuda, cuda:N")
def train(config, steps, threads, procs, device):
    """Finetune SPHINX on conversation data (YAML CONFIG); resumes from OUT/last when present.

    For several machines, launch it with torchrun instead of --procs."""
    from .train import TrainConfig, train_local

    cfg = TrainConfig.load(config)
    if steps:
        cfg.steps = steps
    if threads:
        cfg.num_threads = threads
    if device:
        cfg.device = device
    out = train_local(cfg, procs)
    from . import dist

    dist.print0(f"checkpoint: {out}")


def _attach_plugin_commands():
    # Commands of the task registry and of plugins (pipelines register theirs this way too).
    from .registry import load_plugins, pm, tasks_command

    from .demo.synth import synth_command

    main.add_command(tasks_command, "tasks")
    main.add_command(synth_command, "synth")
    load_plugins()
    pm.hook.register_commands(cli=main)


_attach_plugin_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
