"""Plug-ins named on the command line as ``package.module:ClassName`` (codecs, scorers, upsamplers)."""

from __future__ import annotations

import importlib
from typing import Optional


def plugin_class(spec: str, what: str, base: Optional[type] = None) -> type:
    """The class a ``package.module:ClassName`` spec names.

    Args:
        spec: ``package.module:ClassName``.
        what: what the plug-in is, for messages (``--codec``, ``scorer``, ``--upsampler``).
        base: the class it must derive from (None: any class).

    Raises:
        ValueError: a malformed spec, a module or name that does not import, or a class that is
            not a ``base``.
    """
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{what} {spec!r} must look like package.module:ClassName")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {spec!r}: cannot import {attr} from {module} ({err})") from None
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        kind = f"a {base.__module__}.{base.__name__} subclass" if base is not None else "a class"
        raise ValueError(f"{what} {spec!r} is not {kind}")
    return cls
