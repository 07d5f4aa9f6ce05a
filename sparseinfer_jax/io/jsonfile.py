"""Reading a JSON object file (config.json, tokenizer_config.json) with one-line errors."""

from __future__ import annotations

import json
import os
from typing import Any

from sparseinfer_jax.errors import UserError, unreadable


def read_json_object(file: str | os.PathLike, *, missing: str, remedy: str) -> dict[str, Any]:
    """The JSON object in `file`.

    Raises:
      UserError: the file is missing (`missing` says what to do), cannot be read, is not UTF-8
        JSON or not an object (`remedy` says what to do).
    """
    file = os.fspath(file)
    if not os.path.isfile(file):
        folder, name = os.path.split(file)
        raise UserError(f"{folder} has no {name}; {missing}.")
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}); fix that line "
                        f"or {remedy}.") from None
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; {remedy}.") from None
    except OSError as e:
        raise unreadable(file, e) from None
    if not isinstance(value, dict):
        raise UserError(f"{file} must hold a JSON object, got {type(value).__name__}.")
    return value
