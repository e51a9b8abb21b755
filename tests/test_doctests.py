"""Every ``>>>`` example in the installed packages runs as written.

The modules are found by walking the packages, so a new module is covered without
listing it here.  Each example runs with fresh globals (only ``__name__``), so it must
import what it uses, as a reader copying it would.
"""
import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("lorafx", "lorafx.passes", "lorafx.hw_targets")
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _modules():
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, package + ".")]
    return sorted(set(names))


MODULES = _modules()


def test_walk_finds_every_package():
    for name in ("lorafx.eval", "lorafx.passes.insert_lora", "lorafx.hw_targets", "lorafx.testing"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module, globs={"__name__": name})
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = []
    for test in tests:
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("doc", ["CONTRIBUTING.md"])
def test_document_examples_run(doc):
    """The worked examples in the repository's documents run as written."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), doc)
    result = doctest.testfile(path, module_relative=False, globs={"__name__": doc}, optionflags=FLAGS,
                              verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0, f"{doc}: {result.failed} of {result.attempted} failed"
