"""seamless(8) and a page for each command, from the click definitions themselves, so a
page never disagrees with ``--help``.

``python3 -m seamless.manpage DIR`` writes ``seamless.8``, ``seamless-upgrade.8``, ...,
``seamless-store-format.8`` into DIR (the Debian package does, at build time). The pages
are rendered with jinja2 from ``resources/manpage.j2``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click
import jinja2

from seamless import __version__
from seamless.cli import cli


@dataclass(frozen=True)
class Page:
    name: str  # "seamless-store-format"
    text: str


def _roff(text: str) -> str:
    """Text as roff: backslashes and hyphens escaped, no line starting with a control
    character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _paragraphs(help_text: str) -> list[str]:
    paragraphs = [" ".join(p.split()) for p in help_text.replace("\b", "").split("\n\n")]
    return [p for p in paragraphs if p]


def _render(template: jinja2.Template, command: click.Command, path: list[str],
            ctx: click.Context) -> list[Page]:
    name = "-".join(path)
    options = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is not None:  # what --help shows: the names with the metavar, the help
            options.append({"names": record[0], "help": " ".join(record[1].split())})
    subcommands: list[tuple[str, click.Command]] = []
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            found = command.get_command(ctx, sub)
            if found is not None and not found.hidden:
                subcommands.append((sub, found))
    summary = command.get_short_help_str(limit=200)
    text = template.render(
        name=name, summary=summary, version=__version__,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        usage=" ".join(path) + " " + " ".join(command.collect_usage_pieces(ctx)),
        description=_paragraphs(command.help or summary),
        options=options,
        commands=[{"name": sub, "summary": cmd.get_short_help_str(limit=200),
                   "page": f"{name}-{sub}"} for sub, cmd in subcommands],
        see_also=sorted({"seamless"} - {name}) + [f"{name}-{sub}" for sub, _ in subcommands],
    )
    pages = [Page(name, text)]
    for sub, cmd in subcommands:
        pages += _render(template, cmd, [*path, sub], click.Context(cmd, info_name=sub,
                                                                   parent=ctx))
    return pages


def pages() -> list[Page]:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                             undefined=jinja2.StrictUndefined)
    env.filters["roff"] = _roff
    source = resources.files("seamless").joinpath("resources/manpage.j2").read_text()
    template = env.from_string(source)
    return _render(template, cli, ["seamless"], click.Context(cli, info_name="seamless"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m seamless.manpage DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for page in pages():
        (out / f"{page.name}.8").write_text(page.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
