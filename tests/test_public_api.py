"""The public API: what `covalent_gcpbatch_array` exports, and nothing by accident."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import covalent_gcpbatch_array
from covalent_gcpbatch_array import exceptions


class TestExportedMembers:
    def test_all_is_exactly_the_public_api(self) -> None:
        assert set(covalent_gcpbatch_array.__all__) == {
            "GCPBatchArrayExecutor",
            "ExecutorConfig",
            "JobShape",
            "__version__",
            *exceptions.__all__,
        }

    def test_every_export_resolves(self) -> None:
        for name in covalent_gcpbatch_array.__all__:
            assert getattr(covalent_gcpbatch_array, name) is not None

    def test_star_import_gives_all_of_it(self) -> None:
        namespace: dict[str, object] = {}
        exec("from covalent_gcpbatch_array import *", namespace)
        assert set(namespace) - {"__builtins__"} == set(covalent_gcpbatch_array.__all__)

    def test_the_package_imports_without_covalent(self) -> None:
        # Covalent takes seconds to import: only the executor class needs it.
        code = "import sys, covalent_gcpbatch_array\nassert 'covalent' not in sys.modules"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr

    def test_executor_is_loaded_lazily_and_is_the_plugin_class(self) -> None:
        from covalent_gcpbatch_array import gcpbatch_array

        assert covalent_gcpbatch_array.GCPBatchArrayExecutor is gcpbatch_array.GCPBatchArrayExecutor
        assert gcpbatch_array.EXECUTOR_PLUGIN_NAME == "GCPBatchArrayExecutor"


@pytest.mark.parametrize(
    "name",
    [
        "covalent_gcpbatch_array.runner",
        "covalent_gcpbatch_array._core.contract",
        "covalent_gcpbatch_array._core.envelopes",
        "covalent_gcpbatch_array._core.storage",
    ],
)
def test_module_all_is_exactly_its_public_names(name: str) -> None:
    """``__all__`` lists every public class, function and constant the module defines, no more."""
    module = importlib.import_module(name)
    public = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_")
        and (
            (callable(value) and getattr(value, "__module__", "") == module.__name__)
            or (attribute.isupper() and not callable(value))
        )
    }
    assert set(module.__all__) == public


class TestExceptionHierarchy:
    def test_every_exception_is_exported_and_drawn_in_the_docstring(self) -> None:
        classes = {
            name
            for name, value in inspect.getmembers(exceptions, inspect.isclass)
            if issubclass(value, Exception) and value.__module__ == exceptions.__name__
        }
        assert classes == set(exceptions.__all__)
        assert exceptions.__doc__ is not None
        for name in classes:
            assert name in exceptions.__doc__

    def test_every_exception_derives_from_the_base(self) -> None:
        for name in exceptions.__all__:
            assert issubclass(getattr(exceptions, name), exceptions.GCPBatchArrayError)
