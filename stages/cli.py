"""The `nanollm` command group: loads and validates params.yaml once, dispatches to stages.

Each stage lives in its own module under stages/ and is imported only when it is
invoked (or listed by --help), and stage modules import torch, mlflow and datasets
inside their command bodies, so `nanollm --help` stays instant.
"""

from __future__ import annotations

import difflib
import errno
import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nanollm.config import NO_VALUE, Config, ConfigError
from nanollm.errors import NanollmError
from nanollm.threads import apply_threads, default_threads

# command name -> module under stages/ that defines `command`
COMMANDS = {
    "download": "stages.download",
    "train_tokenizer": "stages.train_tokenizer",
    "tokenize": "stages.tokenize",
    "pretrain": "stages.pretrain",
    "evaluate": "stages.evaluate",
    "bench_kvcache": "stages.bench_kvcache",
    "ui": "stages.ui",
    "generate": "stages.generate",
    "export-hf": "stages.export_hf",
    "import-hf": "stages.import_hf",
    "register": "stages.register",
    "serve": "stages.serve",
}

# either spelling of a command name (hyphens read as underscores) -> its name in COMMANDS
_SPELLINGS = {name.replace("-", "_"): name for name in COMMANDS}

log = logging.getLogger("nanollm")

# out of space, over a file-size limit, over quota: the user's to fix, not a bug to trace
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class _YamlLoader:
    """PyYAML's SafeLoader, but reading `1e-3` as a float (YAML 1.1 insists on `1.0e-3`)."""

    @staticmethod
    @functools.cache
    def cls() -> type:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(
                r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""",
                re.X,
            ),
            list("-+0123456789."),
        )
        return Loader


def read_params(path: Path) -> dict[str, Any]:
    """Parse params.yaml into a mapping; raises ConfigError with a one-line reason."""
    import yaml

    if not path.is_file():
        raise ConfigError(str(path), NO_VALUE, "params file not found; run from the project root or pass --params")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader.cls())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}", NO_VALUE, f"{problem}; fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), NO_VALUE, "is not UTF-8 text; save it as UTF-8") from None
    return raw if raw is not None else {}


@dataclass(frozen=True)
class StageContext:
    """What every stage command receives: the validated config and where the project is."""

    config: Config
    params_path: Path
    root: Path  # the project root: DVC_ROOT when DVC runs us, else the folder of params.yaml
    threads: int  # CPU threads this stage may use (already applied to torch and OpenMP)


def pass_context(fn: Callable[..., Any] | None = None, *, params_optional: bool = False) -> Any:
    """Decorate a stage command so it receives a StageContext as first argument.

    params_optional: a command that also runs outside a project (`nanollm serve --model-uri`, `nanollm
    register` against a tracking server) takes the defaults when no --params is given and there is no
    params.yaml in the current folder; the project root is then the current folder.
    """
    if fn is None:
        return functools.partial(pass_context, params_optional=params_optional)

    @functools.wraps(fn)
    @click.pass_context
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> Any:
        root_ctx = ctx.find_root()
        params_path: Path = root_ctx.params["params"]
        defaulted = root_ctx.get_parameter_source("params") == click.core.ParameterSource.DEFAULT
        if params_optional and defaulted and not params_path.exists():
            log.info("no %s here: using the default settings", params_path)
            config = Config.from_dict({})
        else:
            config = Config.from_dict(read_params(params_path))
        root = Path(os.environ.get("DVC_ROOT") or params_path.resolve().parent)
        threads, why = (config.threads, "threads in params.yaml") if config.threads else default_threads()
        apply_threads(threads)
        log.info("%d CPU thread(s) (%s)", threads, why)
        return fn(StageContext(config, params_path, root, threads), *args, **kwargs)

    return wrapper


def path_option(flag: str, default: str, help: str, *, folder: bool | None = True) -> Callable[..., Any]:
    """A stage's path option; its default is the path dvc.yaml passes, so both name one place.

    folder=True takes a folder, False a file, None either.
    """
    if folder is None:
        kind = click.Path(path_type=Path)
    else:
        kind = click.Path(file_okay=not folder, dir_okay=folder, path_type=Path)
    return click.option(flag, type=kind, default=Path(default), show_default=True, help=help)


# nanollm generate and nanollm serve: the weights decoding reads (nanollm.inference.loading)
quantize_option = click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    show_default=True,
    help="int8: per-channel int8 weights, a quarter of fp32 weights' bytes (docs/serving.md).",
)


class _Group(click.Group):
    """Imports stage modules on demand and turns user errors into one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """A command by its name, in either spelling: pipeline stages use underscores (as dvc.yaml
        runs them), the other commands hyphens, and `train-tokenizer` or `export_hf` work too."""
        canonical = _SPELLINGS.get(name.replace("-", "_"))
        if canonical is None:
            return None
        return importlib.import_module(COMMANDS[canonical]).command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as err:
            if not args or "No such command" not in err.message:
                raise
            close = difflib.get_close_matches(args[0].replace("-", "_"), list(_SPELLINGS), n=1, cutoff=0.6)
            if not close:
                raise
            raise click.UsageError(f"{err.message} Did you mean {_SPELLINGS[close[0]]!r}?", ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            where = "" if str(err).startswith(str(ctx.params["params"])) else f"{ctx.params['params']}: "
            click.echo(f"Error: {where}{err}", err=True)
            ctx.exit(2)
        except NanollmError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(1)
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            where = f" writing {err.filename}" if err.filename else ""
            click.echo(f"Error: {os.strerror(err.errno)}{where}; free some space and re-run the stage", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="The params file every stage reads its settings from.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="nanollm")
def cli(params: Path, verbose: bool) -> None:
    """nanollm: a from-scratch small-LLM lab run as a DVC pipeline.

    download -> train_tokenizer -> tokenize -> pretrain -> evaluate / bench_kvcache.
    `dvc repro` runs them all with the settings in params.yaml.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main() -> None:
    cli(prog_name="nanollm")
