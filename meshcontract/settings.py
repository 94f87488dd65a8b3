"""Loading a service's Settings model once, in its CLI: TOML file, then MESHVPN_* environment, then flags.

No global config: the loaded model is passed explicitly to whatever needs it. Nested models are addressed in
the environment with a double underscore: MESHVPN_BROKER__URL sets settings.broker.url.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from meshcontract.errors import ContractError

S = TypeVar("S", bound=BaseModel)
ENV_PREFIX = "MESHVPN_"


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ContractError(f"setting {'.'.join(path)} conflicts with a non-table value")
    data[path[-1]] = value


def load_settings(
    model: type[S],
    *,
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Build `model` from an optional TOML file, MESHVPN_* variables and explicit overrides (CLI flags).

    Later sources win. Override keys may be dotted ("broker.url"); None values are ignored so unset flags
    do not clobber the file. Raises ContractError naming the source of a bad value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ContractError(f"cannot read settings file {path}: {exc}") from exc
    env = os.environ if environ is None else environ
    fields = set(model.model_fields)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        if keys[0] in fields:
            _set_path(data, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(data, dotted.split("."), value)
    try:
        # Environment values are strings: validate in lax mode so "5" becomes 5 for int fields.
        return model.model_validate(data, strict=False)
    except ValidationError as exc:
        raise ContractError(f"invalid {model.__name__} (file {path or '-'}, env, flags): {exc}") from exc
