"""``fedseg install-policy KIT``: FedRef-Seg's policy files into a startup kit's ``local/`` folder.

Run by whoever owns the kit, on the machine that runs it (docs/operations.md says who edits what):
- a hospital site's kit gets ``authorization.json`` (no bring-your-own-code for anyone), ``resources.json``
  (the kit's own resources with our class allow-list, enforced, and no streaming of job logs to the
  server), ``privacy.json`` (a percentile filter on the weight differences the site sends, with a per-round
  clip) and ``fedseg_site.json`` (the site's data and cache folders, what it allows, its caps on a job);
- the server's kit gets ``resources.json`` with the same kind of allow-list and its job store and snapshots
  in ``--store`` instead of under /tmp, ``authorization.json`` (the same: no bring-your-own-code for
  anyone) and ``fedseg_server.json`` (its caps on what a job may ask and its checkpoint store, the defaults);
- both get the configuration-only app validator (``fedseg.policy.ConfigOnlyJobValidator``) in
  ``resources.json``: FLARE refuses to deploy an app holding anything but its two JSON configs.
A policy file that already exists with other content is kept unless ``--force`` (then it is saved as
``<name>.before-fedseg`` first). Files are written atomically; the kit's ``*.default`` files are only read.
"""

from __future__ import annotations

import json
import os
import shutil

from fedseg.atomic import write_json
from fedseg.policy import with_allow_list
from fedseg.regions import DATALIST_NAME
from fedseg.server_config import SERVER_CONFIG_FILE, ServerConfig
from fedseg.site_config import SITE_CONFIG_FILE, SiteConfig
from fedseg.stale_jobs import COMPONENT_ID as STALE_JOBS_ID
from fedseg.stale_jobs import COMPONENT_PATH as STALE_JOBS_PATH

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site_policy")
SITE_TEMPLATES = ("authorization.json", "privacy.json")
BACKUP_SUFFIX = ".before-fedseg"


class PolicyError(ValueError):
    """The kit or an option cannot take the policy; the message says which and why."""


def kit_role(kit: str) -> str:
    """``server`` or ``site``, from the kit's startup folder."""
    startup = os.path.join(kit, "startup")
    if os.path.isfile(os.path.join(startup, "fed_server.json")):
        return "server"
    if os.path.isfile(os.path.join(startup, "fed_client.json")):
        return "site"
    raise PolicyError(f"{kit}: not a server or site startup kit (no startup/fed_server.json or fed_client.json)")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def kit_resources(kit: str) -> dict:
    """The kit's resources as FLARE reads them: ``resources.json`` if present, else ``resources.json.default``."""
    local = os.path.join(kit, "local")
    for name in ("resources.json", "resources.json.default"):
        if os.path.isfile(os.path.join(local, name)):
            return _read_json(os.path.join(local, name))
    raise PolicyError(f"{kit}: no local/resources.json(.default); is this a provisioned kit?")


def server_resources(resources: dict, store: str) -> dict:
    """The server's resources with its job store and snapshots under ``store``."""
    store = os.path.abspath(store)
    out = json.loads(json.dumps(resources))  # a deep copy
    persistor = out.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if persistor is not None:
        persistor["root_dir"] = os.path.join(store, "snapshot-storage")
    for component in out.get("components", []):
        if component.get("id") == "job_manager":
            component.setdefault("args", {})["uri_root"] = os.path.join(store, "jobs-storage")
    components = out.setdefault("components", [])
    if not any(c.get("id") == STALE_JOBS_ID for c in components):  # a restarted server lets go of its dead jobs
        components.append({"id": STALE_JOBS_ID, "path": STALE_JOBS_PATH, "args": {}})
    return with_allow_list(out, "server")


def site_settings(kit: str, data_root: str | None, cache_dir: str | None) -> dict:
    """``fedseg_site.json``: the site's folders (checked now, so that a typo is found before a job runs), what
    it lets a job do and its caps on a job's settings, written out with their defaults (``SiteConfig``) so
    that hospital IT sees each one it may change."""
    defaults = SiteConfig().to_json()
    settings: dict = {k: v for k, v in defaults.items() if k not in ("data_root", "cache_dir")}
    if data_root:
        data_root = os.path.abspath(data_root)
        if not os.path.isdir(data_root):
            raise PolicyError(f"--data-root {data_root}: no such folder")
        site = os.path.basename(os.path.normpath(kit))
        if not os.path.isfile(os.path.join(data_root, site, DATALIST_NAME)):
            raise PolicyError(
                f"--data-root {data_root}: no prepared folder {site}/ with a {DATALIST_NAME} for this "
                f"kit's site (prepare it with `fedseg prepare ... --name-template {site}`)"
            )
        settings["data_root"] = data_root
    if cache_dir:
        settings["cache_dir"] = os.path.abspath(cache_dir)
    return settings


def planned_files(
    kit: str, data_root: str | None = None, cache_dir: str | None = None, store: str | None = None
) -> dict[str, dict]:
    """What ``install_policy`` writes: local/ file name -> content."""
    role = kit_role(kit)
    resources = kit_resources(kit)
    if role == "server":
        return {
            "resources.json": server_resources(resources, store or os.path.join(kit, "store")),
            "authorization.json": _read_json(os.path.join(TEMPLATES, "authorization.json")),
            SERVER_CONFIG_FILE: ServerConfig().to_json(),
        }
    files = {name: _read_json(os.path.join(TEMPLATES, name)) for name in SITE_TEMPLATES}
    # job logs stay on the site: they name its cases' counts, but FLARE would stream them to the server
    files["resources.json"] = {**with_allow_list(resources, "site"), "allow_log_streaming": False}
    files[SITE_CONFIG_FILE] = site_settings(kit, data_root, cache_dir)
    return files


def install_policy(
    kit: str, data_root: str | None = None, cache_dir: str | None = None, store: str | None = None, force: bool = False
) -> list[str]:
    """Write the policy files into ``<kit>/local``; returns their paths."""
    kit = os.path.abspath(kit)
    local = os.path.join(kit, "local")
    files = planned_files(kit, data_root, cache_dir, store)
    conflicts = [
        name
        for name, content in files.items()
        if name != SITE_CONFIG_FILE
        and os.path.isfile(os.path.join(local, name))
        and _read_json(os.path.join(local, name)) != content
    ]
    if conflicts and not force:
        raise PolicyError(
            f"{local}: {', '.join(conflicts)} already exist with other content; compare them with "
            f"`fedseg install-policy --show`, or pass --force (the old files are kept as *{BACKUP_SUFFIX})"
        )
    written = []
    for name, content in files.items():
        path = os.path.join(local, name)
        if name in conflicts:
            shutil.copy2(path, path + BACKUP_SUFFIX)
        write_json(path, content)
        written.append(path)
    return written
