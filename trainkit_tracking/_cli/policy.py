"""The ``policy`` commands: check a naming policy file, show the default, convert the seed's."""

from __future__ import annotations

from pathlib import Path

import click

from trainkit_tracking._cli.common import EXIT_PROBLEM, EXIT_USAGE, CliError
from trainkit_tracking._cli.naming import SEED_HEADER, convert_file, policy_yaml, sample_names
from trainkit_tracking._core.naming import NamingPolicy
from trainkit_tracking.errors import PolicyError, TagKeyError


@click.group()
def policy() -> None:
    """Naming policy files."""


@policy.command("check", short_help="Validate a naming policy file.")
@click.argument("file", type=click.Path(path_type=Path))
def policy_check(file: Path) -> None:
    """Validate a naming policy file and show a sample name per kind.

    Exits 0 when it is valid, 1 with the problem when it is not.
    """
    _existing(file)
    try:
        loaded = NamingPolicy.from_yaml(file)
        samples = sample_names(loaded)
    except PolicyError as exc:
        raise CliError(str(exc), EXIT_PROBLEM) from exc
    click.echo(f"ok: {file} is a valid naming policy")
    width = max(len(kind) for kind in samples)
    for kind, sample in samples.items():
        click.echo(f"  {kind.ljust(width)}  {sample}")


@policy.command("show", short_help="Print the default naming policy as YAML.")
@click.option("--seed", is_flag=True, help="Print the seed's policy (NamingPolicy.seed()).")
def policy_show(seed: bool) -> None:
    """Print the default naming policy as a YAML file to start from.

    Save it (`trainkit-tracking policy show > naming.yaml`), edit it, and load it with
    NamingPolicy.from_yaml; with `extends: default` a file lists only the kinds it changes.
    `--seed` prints the seed repo's policy, the default until 0.2.
    """
    if seed:
        click.echo(policy_yaml(NamingPolicy.seed(), SEED_HEADER), nl=False)
    else:
        click.echo(policy_yaml(NamingPolicy.default()), nl=False)


def _existing(file: Path) -> None:
    """A CliError (exit 2) with the close names of its folder when ``file`` is not a file."""
    from trainkit_tracking._core.yaml_files import missing_file_hint

    hint = missing_file_hint(file)
    if hint is not None:
        raise CliError(f"{hint}check the path", EXIT_USAGE)


@policy.command("convert", short_help="Convert the seed repo's naming.yaml or tags.yaml.")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the result to this file (default: standard output).",
)
def policy_convert(file: Path, output: Path | None) -> None:
    """Write the seed repo's config/naming.yaml or config/tags.yaml in this SDK's format.

    The naming file becomes a naming policy (versions only on sweep, trial, refit and
    benchmarking runs, as the seed did); the tag file becomes TagKeys overrides. Exits 1
    when the file asks for names this SDK would render differently.
    """

    _existing(file)
    try:
        text = convert_file(file)
    except (PolicyError, TagKeyError) as exc:
        raise CliError(str(exc), EXIT_PROBLEM) from exc
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
