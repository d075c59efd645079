"""``python -m sphinx_tools.demo build|quality|probe|oracle``: build the demo model, measure it."""

from .oracle import oracle_command
from .probe import probe_command
from .quality import quality_command
from .recipe import cli

cli.add_command(quality_command)
cli.add_command(probe_command)
cli.add_command(oracle_command)

if __name__ == "__main__":
    cli()
