"""The built-in quantization grids, one file each; importing this package registers every grid module in it.

A module here registers its grid with :func:`hf_cage.kernels.grid.register_grid` when imported; modules whose
name starts with ``_`` hold shared bases and register nothing. So a new grid is one new file here (plus its
tests), or a :func:`~hf_cage.kernels.grid.register_grid` call from outside the package.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
