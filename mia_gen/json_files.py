"""Small JSON files that are data (a split, a shadow zoo's IN/OUT matrix): written whole, read with
errors that name the file and say what to do."""

from __future__ import annotations

import json
import os
from typing import Any

from mia_gen.errors import MiaGenError, MissingAssetError


def write_json(path: str | os.PathLike, content: Any) -> None:
    """Write `content` as indented JSON to `path`, creating parent folders."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.write("\n")


def read_json(path: str | os.PathLike, what: str, if_missing: str, if_invalid: str) -> Any:
    """The parsed content of `path`. `what` names the file in errors ("Split file"); `if_missing` and
    `if_invalid` say what to do when it does not exist or is not valid JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingAssetError(f"{what} {path!r} does not exist; {if_missing}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MiaGenError(f"{what} {path!r} is not valid JSON ({error}); {if_invalid}") from error
