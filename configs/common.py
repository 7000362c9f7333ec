"""Helpers shared by the configs: the `path.py:key=value,flag` argument grammar."""

from __future__ import annotations

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument like "paper,batch_size=64,steps=200" against typed defaults.

  Each `key=value` is converted to the type of its default (bool accepts true/false/1/0; tuples and lists take
  a Python literal); a bare `key` sets a bool default to True. Unknown keys raise an error listing the known
  ones, so a typo never passes silently.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r}: expected true/false")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, (tuple, list)):
      out[key] = type(default)(ast.literal_eval(value))
    else:
      out[key] = type(default)(value)
  return out
