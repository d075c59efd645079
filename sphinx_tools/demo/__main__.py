"""``python -m sphinx_tools.demo build|quality|probe``: build the demo model, measure it."""

from .probe import probe_command
from .quality import quality_command
from .recipe import cli

cli.add_command(quality_command)
cli.add_command(probe_command)

if __name__ == "__main__":
    cli()
