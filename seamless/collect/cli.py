"""Commands of the collect stage: ``seamless plan`` (and later ``checkpoint``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from seamless.collect.plan import StoreSpace, make_plan, render
from seamless.collect.processes import read_table
from seamless.collect.select import CONFIG_PATH, RULE_KINDS, Selection, load_config
from seamless.errors import ExitCode

#: Asks the store how much it can take; the memstore package sets the real one.
store_space: Callable[[], StoreSpace] = lambda: StoreSpace(  # noqa: E731
    None, None, "no store: prepare the preserved region with seamless store format"
)


def selection_options(f: Callable[..., object]) -> Callable[..., object]:
    kinds = "|".join(RULE_KINDS)
    f = click.option("--include", "includes", multiple=True, metavar=f"{kinds}:VALUE",
                     help="Checkpoint only trees whose root matches (repeatable).")(f)
    f = click.option("--exclude", "excludes", multiple=True, metavar=f"{kinds}:VALUE",
                     help="Leave out trees whose root matches (repeatable).")(f)
    f = click.option("--config", "config_path", type=click.Path(path_type=Path),
                     default=CONFIG_PATH, show_default=True,
                     help="Config file with a [select] table of include/exclude rules.")(f)
    return f


def selection_from(includes: tuple[str, ...], excludes: tuple[str, ...],
                   config_path: Path) -> Selection:
    return load_config(config_path).merged(Selection.from_texts(includes, excludes))


@click.command("plan")
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
def plan_command(includes: tuple[str, ...], excludes: tuple[str, ...], config_path: Path,
                 as_json: bool) -> int:
    """Show what a checkpoint would take, and what would block it. Freezes nothing.

    Exits 4 when anything would block the checkpoint.
    """
    selection = selection_from(includes, excludes, config_path)
    plan = make_plan(read_table(), selection, store_space())
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(render(plan))
    return int(ExitCode.OK if plan.ok else ExitCode.CHECK_FAILED)
