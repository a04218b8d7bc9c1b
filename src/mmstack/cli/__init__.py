"""The ``mmstack`` command. Sub-command modules import heavy libraries inside their functions so that
``mmstack --help`` stays fast."""

from __future__ import annotations

import sys

import typer

from mmstack.cli import ask, chat, data, demo, index, search, serve, train, world
from mmstack.cli import eval as eval_cli
from mmstack.cli import generate as generate_cli
from mmstack.errors import MmstackError
from mmstack.utils.progress import console

app = typer.Typer(
    name="mmstack",
    help="mmstack: an open multimodal LLM stack (two-tower, bridge, native models; index, RAG, serve).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(world.app, name="world")
app.add_typer(data.app, name="data")
app.add_typer(index.app, name="index")
app.add_typer(train.app, name="train")
app.add_typer(eval_cli.app, name="eval")
app.command("demo")(demo.demo)
app.command("search")(search.search)
app.command("serve")(serve.serve)
app.command("chat")(chat.chat)
app.command("ask")(ask.ask)
app.command("generate")(generate_cli.generate)
app.command("caption")(generate_cli.caption)


def _print_version(value: bool) -> None:
    if value:
        from mmstack import __version__

        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """mmstack: an open multimodal LLM stack."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print one line on stderr and exit with status 2, never a traceback."""
    try:
        app(args=argv, prog_name="mmstack")  # standalone mode: usage errors and --help exit by themselves
    except MmstackError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
