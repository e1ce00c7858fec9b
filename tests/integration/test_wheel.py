"""What `pip install` of the project puts on a machine: the `fedseg` package and nothing else at the top
level (no `app` or `jobs` to collide with a hospital's other software), with the files sites need."""

from __future__ import annotations

import glob
import subprocess
import sys
import zipfile

from helpers.commands import REPO_ROOT

import fedseg


def test_the_wheel_installs_one_namespace_with_the_site_policy_templates(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            REPO_ROOT,
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = glob.glob(str(tmp_path / f"fedref_seg-{fedseg.__version__}-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fedseg", f"fedref_seg-{fedseg.__version__}.dist-info"}
    for needed in (
        "fedseg/client.py",
        "fedseg/executor.py",
        "fedseg/app/site_policy/authorization.json",
        "fedseg/app/site_policy/privacy.json",
        "fedseg/app/provision/project.yml",
        "fedseg/data_prep/fets2022.py",
        "fedseg/jobs/recipes.py",
    ):
        assert needed in names, needed
    assert not any(name.startswith("fedseg/jobs/fedref") for name in names)  # job folders are not code
    assert f"fedref_seg-{fedseg.__version__}.dist-info/licenses/LICENSE" in names  # Apache-2.0, as declared
    assert "fedseg/app/render.py" not in names  # test-only code (tests/helpers) stays out
