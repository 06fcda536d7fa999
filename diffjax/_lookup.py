"""The one name lookup of diffjax: every ``get_*(name, ...)`` resolves its name here, at the edge.

Imports nothing of diffjax, so every layer (models/ and data/ included) can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["lookup"]

Entry = TypeVar("Entry")


def lookup(table: Mapping[str, Entry], name, what: str, *, hint: str = "") -> Entry:
  """``table[name]``, or one ValueError naming the value and the choices:
  ``unknown {what} {name!r}; choose one of [...]{hint}``.

  Args:
    table: the names a user may choose from and what each resolves to.
    name: the user's value (any type: an unhashable one is reported like an unknown name).
    what: what a name of this table is, for the message ("sampler", "noise model", ...).
    hint: appended to the message (e.g. what the choices mean, or another way to get one).
  """
  try:
    return table[name]
  except (KeyError, TypeError):
    # TypeError: an unhashable name (a list from a config) is a wrong name, not a crash.
    raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}{hint}") from None
