"""The one TOML writer of the project (``tomllib`` only reads; ``tomli_w`` is not a dependency).

:func:`dumps` renders a mapping as a TOML document (the hospital config, the ``flwr`` CLI's
``config.toml``); :func:`config_args` renders one as Flower's ``key=value key=value`` string
(``--node-config``, ``--run-config``). Both write values with :func:`toml_value`. Standard
library only, so that any part of the app can use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath

from medsegdiff_core.errors import ConfigError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    """A TOML basic string: quoted, with backslashes, quotes and control characters escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else _string(text)


def toml_value(value: object) -> str:
    """A TOML value: booleans, integers, floats, strings (``Path`` too), arrays and inline
    tables of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | PurePath):
        return _string(str(value))
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def dumps(document: Mapping[str, object]) -> str:
    """``document`` as TOML text: plain values first, then each nested mapping as a
    ``[table]`` (``[a.b]`` for deeper ones); ``None`` values are left out."""
    lines: list[str] = []

    def table(name: tuple[str, ...], mapping: Mapping[str, object]) -> None:
        plain = {k: v for k, v in mapping.items() if v is not None and not isinstance(v, Mapping)}
        tables = {k: v for k, v in mapping.items() if isinstance(v, Mapping)}
        if name and (plain or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(toml_key(part) for part in name) + "]")
        lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in plain.items())
        for key, sub in tables.items():
            table((*name, str(key)), sub)

    table((), document)
    return "\n".join(lines) + "\n"


def config_args(items: Mapping[str, object]) -> str:
    """Flower's ``key=value key=value`` form (``flwr.common.config.parse_config_args``): each
    value in TOML syntax, strings quoted so that spaces survive. Flower splits at the closing
    quote, so a string holding ``"`` is written as a TOML literal string (``'...'``), and one
    holding both kinds of quote is refused."""
    parts = []
    for key, value in items.items():
        if isinstance(value, str | PurePath):
            text = str(value)
            if '"' not in text:
                shown = _string(text)
            elif "'" not in text and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
                shown = f"'{text}'"
            else:
                raise ConfigError(
                    f"{key}: {text!r}: a value may hold single or double quotes, not both"
                )
        elif isinstance(value, bool | int | float):
            shown = toml_value(value)
        else:
            raise ConfigError(f"{key}: {value!r}: only strings, numbers and booleans")
        parts.append(f"{key}={shown}")
    return " ".join(parts)
