"""Command-line options derived from RunConfig's fields, so the CLI holds no second copy of a default, a help
text or a list of choices.

`with_run_options(command)` gives a Typer command one option per RunConfig field (`--image-size`, `--flip/
--no-flip`, repeatable `--method-arg key=value`) plus a generic `--set KEY=VALUE`; every option defaults to None,
meaning "not given", so a flag the user did not type never overrides a `--config` file. The command receives
the given values as one dict, `settings`.
"""
from __future__ import annotations

import functools
import inspect
from typing import List, Optional

import typer

from samfit.config import FIELDS, coerce, field_type, help_text, option_name, parse_set
from samfit.errors import SamfitError
from samfit.keyvalue import parse_pairs


def _option(key: str) -> tuple[type, typer.models.OptionInfo]:
    flag = option_name(key)
    if field_type(key) is dict:
        return Optional[List[str]], typer.Option(None, flag, help=help_text(key) + " Repeatable.")
    if field_type(key) is bool:
        negative = "--no-" + flag[2:]
        return Optional[bool], typer.Option(None, f"{flag}/{negative}", help=help_text(key))
    return Optional[field_type(key)], typer.Option(None, flag, help=help_text(key))


def given_settings(values: dict, set_pairs: list[str] | None) -> dict:
    """The RunConfig values given on the command line: flags, then `--set` (a key given both ways is an error)."""
    given = {}
    for key, value in values.items():
        if value is None:
            continue
        if field_type(key) is dict:
            value = parse_pairs(value, option_name(key), "rank=4")
        given[key] = coerce(key, value, f"{option_name(key)}: ")
    for key, value in parse_set(set_pairs).items():
        if key in given:
            raise SamfitError(f"{key} is given twice, as {option_name(key)} and as --set {key}=…; keep one.")
        given[key] = value
    return given


def with_run_options(command):
    """Decorate a Typer command taking `settings: dict` (plus its own options) with RunConfig's options."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    generated = []
    for key in FIELDS:
        annotation, default = _option(key)
        generated.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                           annotation=annotation))
    set_param = inspect.Parameter(
        "set_", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[List[str]],
        default=typer.Option(None, "--set", help="KEY=VALUE for any run setting (read as YAML), repeatable."))

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {key: kwargs.pop(key) for key in FIELDS}
        return command(settings=given_settings(values, kwargs.pop("set_")), **kwargs)

    params = generated + [set_param] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # Typer must read the new signature, not the command's
    return wrapper
