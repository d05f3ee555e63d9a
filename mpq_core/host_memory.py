"""How much memory this process may use: the machine's, or less when its cgroup (a container's
``mem_limit``, a systemd slice) sets a limit.

Both cgroup versions are read: v2's ``memory.max`` and v1's ``memory.limit_in_bytes`` (hybrid
hosts still put the memory controller on v1). Inside a container the cgroup's own folder is
usually mounted as the root of the hierarchy, so the file is looked for both under the path
``/proc/self/cgroup`` names and at the root. Standard library only: the worker, which never
imports torch, sizes its jobs with it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cgroup_memory_limit", "default_job_memory_bytes", "physical_memory_bytes"]

#: A job may use this share of what the process may use; the rest is the worker's own.
JOB_MEMORY_SHARE = 0.8
# cgroup v1 writes "no limit" as a huge page-rounded number (2**63 - 4096 on x86-64).
_V1_UNLIMITED = 2**60


def physical_memory_bytes() -> int:
    """The machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memberships(proc_root: Path) -> dict[str, str]:
    """``{controller: path}`` of this process's cgroups; ``""`` is the v2 hierarchy."""
    found: dict[str, str] = {}
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                found[controller] = parts[2]
    return found


def _read_limit(folders: list[Path], name: str) -> int | None:
    for folder in folders:
        try:
            text = (folder / name).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return None if value >= _V1_UNLIMITED else value
    return None


def cgroup_memory_limit(
    proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The memory limit of this process's cgroup in bytes, or None (no limit, or none found)."""
    cgroups = _memberships(proc_root)
    limits = []
    if "memory" in cgroups:  # v1
        base = cgroup_root / "memory"
        rel = cgroups["memory"].lstrip("/")
        limits.append(_read_limit([base / rel, base], "memory.limit_in_bytes"))
    if "" in cgroups:  # v2
        rel = cgroups[""].lstrip("/")
        limits.append(_read_limit([cgroup_root / rel, cgroup_root], "memory.max"))
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def default_job_memory_bytes(
    proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """The memory a job's process gets when none is configured: a share of the machine's RAM,
    or of the cgroup's limit when that is lower (a job in a container then fails cleanly with
    ``memory_limit_exceeded`` instead of the container being killed)."""
    usable = physical_memory_bytes()
    limit = cgroup_memory_limit(proc_root, cgroup_root)
    if limit is not None:
        usable = min(usable, limit)
    return int(JOB_MEMORY_SHARE * usable)
