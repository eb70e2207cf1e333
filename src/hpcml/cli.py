"""The `hpcml` command: parse flags -> Config -> call the Python API. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hpcml._version import __version__
from hpcml.errors import HpcmlError, UsageError

app = typer.Typer(
    name="hpcml",
    help="Train and run ML models as fast as the hardware allows, and prove it.\n\n"
    "Examples:\n\n"
    "  hpcml train                                  # convnet1d on MNIST-1D, 8 epochs\n\n"
    "  hpcml train --data digits --model cnn2d --json\n\n"
    "  hpcml evaluate runs/demo/model --data mnist1d",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": False}
_TRUST_CODE = typer.Option(
    "--trust-code",
    help="Allow a model dir whose architecture is your own module:function to import that module "
    "(it runs its code). Built-in and installed plugin models never need this.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hpcml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _STATE["debug"] = debug


from hpcml.cli_train import register as _register_train  # noqa: E402  (`hpcml train`; no torch)

_register_train(app)


@app.command(
    help="Evaluate a saved model dir on the test split of a built-in dataset, or on every row of a file.\n\n"
    "Examples:\n\n  hpcml evaluate runs/demo/model --data mnist1d --json\n\n"
    "  hpcml evaluate runs/houses/model --data holdout.csv\n\n"
    "  hpcml evaluate runs/mine/model --data digits --trust-code   # trained with --model mynets:build",
)
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="A model dir (model.safetensors + model.json).")],
    data: Annotated[
        str,
        typer.Option(help="mnist1d, digits, synthetic (their test split), or a file/store/URL (all rows)."),
    ] = "mnist1d",
    target: Annotated[str | None, typer.Option(help="Label column (default: the model's).")] = None,
    missing: Annotated[
        str, typer.Option(help="Rows with missing values: drop, mean, median, error.")
    ] = "drop",
    trust_code: Annotated[bool, _TRUST_CODE] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    from hpcml.api import evaluate as api_evaluate
    from hpcml.config import build_config

    cfg = build_config({"data": {"name": data, "missing": missing}}, source="flags").data
    result = api_evaluate(model_dir, cfg, target=target, trust_code=trust_code)
    if json_:
        typer.echo(json.dumps(result, indent=2))
    elif result["task"] == "regression":
        typer.echo(
            f"{result['model']} on {result['data']} ({result['rows']} rows): "
            f"RMSE {result['test_rmse']:.4f}, R² {result['test_r2']:.4f}"
        )
    else:
        typer.echo(
            f"{result['model']} on {result['data']} ({result['rows']} rows): "
            f"test accuracy {result['test_accuracy']:.4f}, test loss {result['test_loss']:.4f}"
        )


from hpcml.cli_data import data_app  # noqa: E402  (the `hpcml data` group; imports nothing heavy)

app.add_typer(data_app, name="data")

from hpcml.cli_tasks import register as _register_tasks  # noqa: E402  (`hpcml sweep | predict`; no torch)

_register_tasks(app)

from hpcml.cli_bench import register as _register_bench  # noqa: E402  (`hpcml bench`; no torch)

_register_bench(app)

from hpcml.cli_models import register as _register_models  # noqa: E402  (`hpcml models`; no torch)

_register_models(app)

from hpcml.cli_serve import register as _register_serve  # noqa: E402  (`hpcml serve`; no torch, no fastapi)

_register_serve(app)

from hpcml.cli_compress import register as _register_compress  # noqa: E402  (`hpcml compress | export`)

_register_compress(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Usage errors exit 2, runtime failures 1; no traceback unless --debug."""
    import gc

    try:
        return _main(argv)
    finally:
        # Free an error's traceback cycles (Arrow tables, torch tensors) now, not during interpreter
        # teardown, where native thread pools already shut down can abort the process ("terminate
        # called without an active exception", exit 134) after the error was reported.
        gc.collect()


def _main(argv: list[str] | None) -> int:
    import warnings

    def _warn(message, category, *_args, **_kw) -> None:  # one line, not the file:line of the warning
        typer.echo(f"hpcml: warning: {message}", err=True)

    warnings.showwarning = _warn
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="hpcml", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort as e:
        # Click turns an EOFError escaping a command into Abort (`raise Abort() from e`); hpcml asks
        # no questions, so that is not Ctrl-D at a prompt but a failed read (a cut file): an error.
        cause = e.__cause__
        if isinstance(cause, EOFError):
            if _STATE["debug"]:
                raise cause from None
            typer.echo(f"hpcml: error: unexpected end of input: {cause} (re-run with --debug)", err=True)
            return 1
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as e:  # bad flag, missing argument, wrong type: exit 2
        if hasattr(e, "show"):
            e.show()
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except HpcmlError as e:
        if _STATE["debug"]:
            raise
        label = "usage error" if isinstance(e, UsageError) else "error"
        typer.echo(f"hpcml: {label}: {e}", err=True)
        return e.exit_code
    except Exception as e:  # a bug or an environment failure: still no bare traceback by default
        if _STATE["debug"]:
            raise
        typer.echo(f"hpcml: error: {type(e).__name__}: {e} (re-run with --debug for the traceback)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
