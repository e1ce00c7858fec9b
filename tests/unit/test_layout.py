"""The package's shape: small modules with one job, short functions, and commands that run as installed."""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest
from helpers.commands import REPO_ROOT

# the installed package's source folders (fedseg, fedseg.app, fedseg.data_prep, fedseg.jobs)
PACKAGE_DIRS = ("custom/fedseg", "app", "data_prep", "jobs")
CHECKED_DIRS = (*PACKAGE_DIRS, "bench")  # the benchmarks are code people read and run too
MAX_MODULE_LINES = 420  # "about 400": a module past this does more than one job
MAX_FUNCTION_LINES = 65  # "about 60": a function past this is several steps that want names


def package_modules(folders: tuple[str, ...] = PACKAGE_DIRS) -> list[str]:
    found = []
    for folder in folders:
        found += glob.glob(os.path.join(REPO_ROOT, folder, "*.py"))
    return sorted(found)


def relative(path: str) -> str:
    return os.path.relpath(path, REPO_ROOT)


@pytest.mark.parametrize("path", package_modules(CHECKED_DIRS), ids=relative)
def test_a_package_module_stays_small(path):
    with open(path, encoding="utf-8") as f:
        source = f.read()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{relative(path)} has {lines} lines: split it by what its parts do"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{relative(path)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


# `python -m app` and friends import the checkout's folders by their source names: they work only from the
# checkout's root, never from an installed package
CHECKOUT_ONLY = re.compile(r"""(-m["',\s]+)(app|jobs|data_prep|custom)\b(?!\.)""")


def test_benchmarks_tests_and_docs_run_the_installed_commands():
    files = [
        *glob.glob(os.path.join(REPO_ROOT, "bench", "*.py")),
        *glob.glob(os.path.join(REPO_ROOT, "bench", "*.sh")),
        *glob.glob(os.path.join(REPO_ROOT, "tests", "**", "*.py"), recursive=True),
        *glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")),
        os.path.join(REPO_ROOT, "README.md"),
        os.path.join(REPO_ROOT, "Makefile"),
    ]
    offenders = []
    for path in files:
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if CHECKOUT_ONLY.search(line):
                    offenders.append(f"{relative(path)}:{number}: {line.strip()}")
    assert not offenders, "run python -m fedseg.app / fedseg.data_prep / fedseg.jobs instead:\n" + "\n".join(offenders)


def test_the_checkout_only_pattern_catches_what_it_is_for():
    assert CHECKOUT_ONLY.search('[sys.executable, "-m", "app", "simulate"]')
    assert CHECKOUT_ONLY.search("python -m data_prep fets2022 /data")
    assert not CHECKOUT_ONLY.search('[sys.executable, "-m", "fedseg.app", "simulate"]')
    assert not CHECKOUT_ONLY.search("python -m fedseg.data_prep fets2022")


def test_test_only_code_is_not_in_the_package():
    """Helpers that only tests use live in tests/helpers, which the wheel does not ship."""
    helpers = {
        os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO_ROOT, "tests", "helpers", "*.py"))
    }
    shipped = {os.path.splitext(os.path.basename(p))[0] for p in package_modules()}
    assert not (helpers - {"__init__"}) & shipped, "a test helper has a namesake in the package"
