"""Mutation score of the core modules (`make mutation`): mutmut on the fast unit tests of each module.

mutmut 3 finds the code it mutates under ./, src/ or source/ and names each function by its file path,
while this repository installs custom/, app/, data_prep/ and jobs/ as one package ``fedseg``. So the
driver stages a copy laid out as installed (bench/.work/mutation/src/fedseg/...), with the tests, and runs
mutmut there: the checkout is never changed. Each target is a module, or the named functions of a module,
with the unit tests that exercise it (never the integration tests: a mutant costs one run of its tests).

The score per target (killed / mutants, a timeout counts as killed) goes to bench/results/mutation.json;
survivors are listed by name, to be killed by a test or explained in docs/testing.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS_DIR

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "mutation"
# where each part of the installed package comes from (pyproject.toml's package-dir)
PACKAGE_PARTS = {"custom/fedseg": "fedseg", "app": "fedseg/app", "data_prep": "fedseg/data_prep", "jobs": "fedseg/jobs"}


@dataclass(frozen=True)
class Target:
    name: str
    path: str  # in the installed package, e.g. fedseg/fedref.py
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # empty: every function of the module

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def patterns(self) -> list[str]:
        """mutmut's names of this target's mutants: module.x_function__mutmut_N (methods: xǁClassǁmethod)."""
        if not self.functions:
            return [f"{self.module}.*"]
        return [f"{self.module}.*{name}__mutmut_*" for name in self.functions]

    def owns(self, mutant: str) -> bool:
        if not mutant.startswith(self.module + "."):
            return False
        function = mutant[len(self.module) + 1 :].rsplit("__mutmut_", 1)[0]
        return not self.functions or any(function.endswith(("_" + f, "ǁ" + f)) for f in self.functions)


TARGETS = (
    Target("fedref", "fedseg/fedref.py", ("tests/unit/test_fedref.py", "tests/unit/test_controller.py")),
    Target("regions", "fedseg/regions.py", ("tests/unit/test_regions_metrics.py",)),
    Target("metrics", "fedseg/metrics.py", ("tests/unit/test_regions_metrics.py",)),
    Target(
        "controller update checks",
        "fedseg/aggregation.py",
        ("tests/unit/test_controller.py",),
        ("update_problem", "num_steps_weight"),
    ),
    Target(
        "controller round records",
        "fedseg/rounds.py",
        ("tests/unit/test_controller.py", "tests/unit/test_participation.py"),
        ("enough_updates", "_plain"),
    ),
    Target("data_prep checks", "fedseg/data_prep/checks.py", ("tests/unit/test_checks.py",)),
    Target("data_prep partitions", "fedseg/data_prep/partitions.py", ("tests/unit/test_checks.py",)),
    Target("report pooling", "fedseg/app/report.py", ("tests/unit/test_report.py",), ("pooled", "_number", "_pick")),
)


def stage(targets: tuple[Target, ...]) -> None:
    """A fresh copy of the package (src/fedseg, as installed) and the tests, with mutmut's settings."""
    shutil.rmtree(WORK, ignore_errors=True)
    for source, destination in PACKAGE_PARTS.items():
        for file in (ROOT / source).glob("*.py"):  # the package's modules, not the committed job folders
            (WORK / "src" / destination).mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, WORK / "src" / destination / file.name)
    shutil.copytree(ROOT / "tests", WORK / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    tests = sorted({t for target in targets for t in target.tests})
    files = sorted({f"src/{target.path}" for target in targets})
    (WORK / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {json.dumps(files)}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps([*tests, '-m', 'not integration'])}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        "\n[tool.pytest.ini_options]\n"
        'markers = ["integration: runs a real FLARE federation"]\n',
        encoding="utf-8",
    )


def run_mutmut(targets: tuple[Target, ...], children: int) -> None:
    patterns = [p for target in targets for p in target.patterns()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *patterns]
    subprocess.run(command, cwd=WORK, env=env, check=True)


def exit_codes() -> dict[str, int | None]:
    """Every mutant's exit code, from the .meta files mutmut leaves beside each mutated file."""
    codes: dict[str, int | None] = {}
    for meta in (WORK / "mutants").rglob("*.py.meta"):
        codes.update(json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"])
    return codes


def scores(targets: tuple[Target, ...], codes: dict[str, int | None]) -> list[dict]:
    """Per target: mutants, killed (a failing test or a timeout) and the names of the others."""
    from mutmut.stats import status_by_exit_code

    rows = []
    for target in targets:
        mine = {name: status_by_exit_code[code] for name, code in codes.items() if target.owns(name)}
        killed = sorted(n for n, s in mine.items() if s in ("killed", "timeout"))
        others = {n: s for n, s in sorted(mine.items()) if n not in killed}
        rows.append(
            {
                "target": target.name,
                "module": target.module,
                "functions": list(target.functions) or "all",
                "tests": list(target.tests),
                "mutants": len(mine),
                "killed": len(killed),
                "score": round(len(killed) / len(mine), 3) if mine else None,
                "not_killed": others,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="target names to run (default: all)")
    p.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "mutation.json"))
    p.add_argument("--report-only", action="store_true", help="read the last run's results, run nothing")
    args = p.parse_args(argv)
    targets = tuple(t for t in TARGETS if not args.only or t.name in args.only)
    if not args.report_only:
        stage(targets)
        run_mutmut(targets, args.children)
    rows = scores(targets, exit_codes())
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(
            {"date": datetime.date.today().isoformat(), "tool": "mutmut " + _version(), "targets": rows},
            f,
            indent=2,
            ensure_ascii=False,
        )
        f.write("\n")
    for row in rows:
        print(
            f"{row['target']:28s} {row['killed']:4d}/{row['mutants']:<4d} killed"
            + (f"  ({100 * row['score']:.0f}%)" if row["score"] is not None else "")
        )
        for name, status in row["not_killed"].items():
            print(f"    {status:10s} {name}")
    print(f"results: {args.out}")
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    sys.exit(main())
