"""The package's public surface: every exported name is what it says, never a shadowing submodule."""

import importlib
import pkgutil
import types

import bayescirc


def test_exported_names_stay_functions_after_every_submodule_is_imported():
    for info in pkgutil.iter_modules(bayescirc.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"bayescirc.{info.name}")
    for name in bayescirc._EXPORTS:
        value = getattr(bayescirc, name)
        assert not isinstance(value, types.ModuleType), f"bayescirc.{name} is shadowed by a submodule"
