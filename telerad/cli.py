"""The one ``telerad`` command."""

from __future__ import annotations

import click

from telerad import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="telerad")
def cli() -> None:
    """telerad: Kubernetes operator and runtime for AI-driven teleradiology."""


def main() -> None:
    cli()
