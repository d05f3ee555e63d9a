"""The memory a job may use when none is configured: the machine's, or the cgroup's limit when
lower, on cgroup v2, v1 and hybrid hosts, and inside containers whose cgroup folder is mounted
as the root. The files are laid out as the kernel shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpq_core.host_memory import (
    JOB_MEMORY_SHARE,
    cgroup_memory_limit,
    default_job_memory_bytes,
    physical_memory_bytes,
)

GIB = 1024**3


def _host(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc (with ``self/cgroup``) and /sys/fs/cgroup holding ``files``."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(membership)
    for rel, text in files.items():
        path = cgroup / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return proc, cgroup


@pytest.mark.parametrize(
    ("membership", "files", "expected"),
    [
        # v2, a container with its own cgroup namespace: the limit at the root.
        ("0::/\n", {"memory.max": str(2 * GIB)}, 2 * GIB),
        # v2, the host's view: the container's folder below the root.
        ("0::/docker/abc\n", {"docker/abc/memory.max": str(3 * GIB)}, 3 * GIB),
        # v2 without a cgroup namespace: the path names a folder the container does not see.
        ("0::/docker/abc\n", {"memory.max": str(GIB)}, GIB),
        ("0::/\n", {"memory.max": "max"}, None),
        # v1 and hybrid hosts (the memory controller on v1, an empty v2 hierarchy beside it).
        ("4:memory:/docker/abc\n0::/\n", {"memory/memory.limit_in_bytes": str(4 * GIB)}, 4 * GIB),
        (
            "4:memory:/process_api/x\n",
            {"memory/process_api/x/memory.limit_in_bytes": str(5 * GIB)},
            5 * GIB,
        ),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        ("4:cpuacct,memory:/\n", {"memory/memory.limit_in_bytes": str(GIB)}, GIB),
        # Nothing to read: no limit known.
        ("0::/\n", {}, None),
    ],
)
def test_the_cgroup_limit_is_read_on_every_layout(
    tmp_path: Path, membership: str, files: dict[str, str], expected: int | None
) -> None:
    proc, cgroup = _host(tmp_path, membership, files)
    assert cgroup_memory_limit(proc, cgroup) == expected


def test_a_job_gets_a_share_of_the_container_limit_when_it_is_below_the_ram(
    tmp_path: Path,
) -> None:
    limit = min(physical_memory_bytes() // 2, 8 * GIB)
    proc, cgroup = _host(tmp_path, "0::/\n", {"memory.max": str(limit)})
    assert default_job_memory_bytes(proc, cgroup) == int(JOB_MEMORY_SHARE * limit)
    # A limit above the machine's RAM (or none) leaves the RAM as the bound.
    proc, cgroup = _host(tmp_path / "big", "0::/\n", {"memory.max": str(1024 * GIB * 1024)})
    assert default_job_memory_bytes(proc, cgroup) == int(JOB_MEMORY_SHARE * physical_memory_bytes())


def test_a_missing_proc_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path / "none", tmp_path / "none") is None
