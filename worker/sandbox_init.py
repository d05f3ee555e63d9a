"""The first process inside a job's sandbox: ``python -I -m worker.sandbox_init CONFIG_JSON``.

:mod:`worker.sandbox` starts it, in ``namespaces`` mode under ``unshare`` (new user, mount,
network, PID, IPC and UTS namespaces; it is PID 1 there). It then, before any uploaded byte is
read:

1. builds a new root on a tmpfs holding only what the job needs, read-only: the system
   libraries (``/usr`` and the merged-/usr links), the Python installation and virtual
   environment, the ``mpq_core`` package, a few device nodes; plus the job's ``input`` folder
   (read-only) at ``/job/input``, its ``out`` folder (writable) at ``/job/out``, a small
   private ``/tmp`` and a fresh ``/proc`` of the new PID namespace; then ``pivot_root``s into
   it and detaches the old root, so nothing else of the host's file system is reachable;
2. sets resource limits (memory, CPU time, file size, open files, no core dumps);
3. drops every capability (bounding set, then effective/permitted/inheritable), sets
   ``no_new_privs`` and installs a seccomp filter refusing the system calls a tensor program
   never needs (namespaces, mounts, tracing, kernel keyrings, module loading, ...);
4. forks the job command (with the clean environment it was given) and waits for it. Staying
   PID 1 keeps the kernel's special treatment of a namespace's init away from the job (which
   therefore gets the ordinary default signal actions, e.g. death by ``SIGXCPU``), reaps
   orphans, and means the whole namespace dies with this process.

Its exit status is the job's: the job's exit code, or 128 + the signal that killed it.

In ``process`` mode (no user namespaces on this host) only steps 2, 3 and 4 happen: the job
runs with the limits and the clean environment but sees the host's files and network. The
README says so and ``MPQ_SANDBOX=required`` refuses to run jobs that way.

Only the standard library is imported here: this runs before the job and must stay small.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import struct
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
# statvfs flags with the same values as the mount flags; a bind remount inside a user namespace
# must keep the ones the original mount has locked.
_KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_CAP_LAST = 63


class SetupError(Exception):
    """The sandbox could not be built; the job must not run."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            src.encode() if src else None,
            dst.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {src} on {dst}",
    )


def _bind(src: str, root: str, *, writable: bool = False, dest: str | None = None) -> None:
    """Bind ``src`` at ``root + (dest or src)``; read-only unless ``writable``."""
    target = root + (dest or src)
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).touch()
    _mount(src, target, None, MS_BIND | MS_REC)
    kept = os.statvfs(src).f_flag & _KEPT_FLAGS
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | kept
    if not writable:
        flags |= MS_RDONLY
    _mount(None, target, None, flags)


def _system_paths(root: str) -> None:
    """/usr read-only, and /bin, /lib, ... as on the host (links on merged-/usr systems)."""
    _bind("/usr", root)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), root + host)
        elif os.path.isdir(host):
            _bind(host, root)
    os.makedirs(root + "/etc", exist_ok=True)
    for name in ("ld.so.cache", "ld.so.conf"):
        if os.path.isfile(f"/etc/{name}"):
            _bind(f"/etc/{name}", root)
    # Just enough for getpwuid(): the job has no user of its own to look up.
    Path(root + "/etc/passwd").write_text("root:x:0:0:mpq job:/tmp:/usr/sbin/nologin\n")
    Path(root + "/etc/group").write_text("root:x:0:\n")


def _devices(root: str, extra: list[str]) -> None:
    os.makedirs(root + "/dev", exist_ok=True)
    for name in ("null", "zero", "full", "random", "urandom", *extra):
        path = name if name.startswith("/") else f"/dev/{name}"
        if os.path.exists(path):
            _bind(path, root, writable=True)
    os.makedirs(root + "/dev/shm", exist_ok=True)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")


def _build_root(cfg: dict[str, Any]) -> None:
    root = cfg["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    # /tmp first: Python or a package may live below it (a virtual environment in /tmp), and
    # their binds must land on top of this tmpfs, not under it.
    os.makedirs(root + "/tmp", exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_bytes']}")
    _system_paths(root)
    for path in cfg["readonly"]:
        if os.path.exists(path):
            _bind(path, root)
    _devices(root, cfg.get("devices", []))
    if os.path.isdir("/sys/devices/system/cpu"):  # CPU topology for PyTorch's thread pools
        _bind("/sys/devices/system/cpu", root)
    _bind(cfg["input"], root, dest="/job/input")
    _bind(cfg["out"], root, writable=True, dest="/job/out")
    os.makedirs(root + "/proc", exist_ok=True)
    # Refused where the host masks parts of /proc (e.g. inside Docker): the job then runs
    # without /proc, which PyTorch does not need.
    with contextlib.suppress(SetupError):
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    _check(_libc.syscall(_SYSCALLS["pivot_root"], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _set_limits(limits: dict[str, int | None]) -> None:
    def cap(kind: int, value: int | None, hard: int | None = None) -> None:
        if value is not None:
            resource.setrlimit(kind, (value, value if hard is None else hard))

    cap(resource.RLIMIT_DATA, limits.get("memory_bytes"))
    cpu = limits.get("cpu_seconds")
    # SIGXCPU at the soft limit (which kills: the job keeps the default action), SIGKILL 5 s on.
    cap(resource.RLIMIT_CPU, cpu, None if cpu is None else cpu + 5)
    cap(resource.RLIMIT_FSIZE, limits.get("file_bytes"))
    cap(resource.RLIMIT_NOFILE, 4096)
    cap(resource.RLIMIT_CORE, 0)


def _drop_capabilities() -> None:
    for cap_number in range(_CAP_LAST + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap_number, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    header = struct.pack("II", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # effective, permitted, inheritable: all zero, two 32-bit words each
    _check(_libc.syscall(_SYSCALLS["capset"], header, data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


# System calls a tensor program never needs (x86_64 and aarch64 numbers). Refused with EPERM.
_SYSCALL_TABLES: dict[str, dict[str, int]] = {
    "x86_64": {
        "pivot_root": 155, "capset": 126, "mount": 165, "umount2": 166, "unshare": 272,
        "setns": 308, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "swapon": 167, "swapoff": 168, "reboot": 169, "chroot": 161, "userfaultfd": 323,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "fsopen": 430, "fsmount": 432,
        "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "socket": 41,
    },
    "aarch64": {
        "pivot_root": 41, "capset": 91, "mount": 40, "umount2": 39, "unshare": 97,
        "setns": 268, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "swapon": 224, "swapoff": 225, "reboot": 142, "chroot": 51, "userfaultfd": 282,
        "open_by_handle_at": 265, "name_to_handle_at": 264, "fsopen": 430, "fsmount": 432,
        "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "socket": 198,
    },
}  # fmt: skip
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = _SYSCALL_TABLES.get(platform.machine(), _SYSCALL_TABLES["x86_64"])
_DENIED = tuple(n for n in _SYSCALLS if n != "socket")
_CLONE = {"x86_64": (56, 435), "aarch64": (220, 435)}.get(platform.machine(), (56, 435))
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_CLONE_NAMESPACES = 0x7E020000
AF_UNIX = 1
EPERM = 1
ENOSYS = 38


def _assemble(program: list[tuple[int, int, str | None, str | None, str | None]]) -> bytes:
    """Classic BPF from ``(code, k, label, jump_true, jump_false)`` rows; jumps name labels."""
    where = {row[2]: i for i, row in enumerate(program) if row[2]}
    out = b""
    for i, (code, k, _label, jt, jf) in enumerate(program):
        t = where[jt] - i - 1 if jt else 0
        f = where[jf] - i - 1 if jf else 0
        out += struct.pack("HBBI", code, t, f, k)
    return out


def _seccomp_program() -> bytes:
    """A seccomp filter: EPERM for :data:`_DENIED`, for ``clone`` creating namespaces and for
    sockets other than AF_UNIX (there is no network anyway; this also covers a host without
    network namespaces); ENOSYS for ``clone3`` (whose flags a filter cannot read: the C library
    falls back to ``clone``); kill for a foreign architecture; allow the rest."""
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    arch = _AUDIT_ARCH.get(platform.machine(), _AUDIT_ARCH["x86_64"])
    clone, clone3 = _CLONE
    rows: list[tuple[int, int, str | None, str | None, str | None]] = [
        (ld, 4, None, None, None),
        (jeq, arch, None, "nr", "kill"),
        (ld, 0, "nr", None, None),
        *((jeq, _SYSCALLS[name], None, "eperm", None) for name in _DENIED),
        (jeq, clone3, None, "enosys", None),
        (jeq, clone, None, "clone", None),
        (jeq, _SYSCALLS["socket"], None, "socket", "allow"),
        (ld, 16, "socket", None, None),  # args[0], low 32 bits
        (jeq, AF_UNIX, None, "allow", "eperm"),
        (ld, 16, "clone", None, None),
        (jset, _CLONE_NAMESPACES, None, "eperm", "allow"),
        (ret, allow, "allow", None, None),
        (ret, 0x00050000 | EPERM, "eperm", None, None),
        (ret, 0x00050000 | ENOSYS, "enosys", None, None),
        (ret, kill, "kill", None, None),
    ]
    return _assemble(rows)


def _install_seccomp() -> None:
    program = _seccomp_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buffer))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_buffer, 0, 0), "install seccomp")


def _run_job(argv: list[str], env: dict[str, str], cwd: str) -> int:
    pid = os.fork()
    if pid == 0:  # the job
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    while True:  # reap orphans too; return the job's own status
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            return 127
        if reaped == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def main(argv: list[str] | None = None) -> int:
    cfg = json.loads((sys.argv[1:] if argv is None else argv)[0])
    try:
        if cfg["mode"] == "namespaces":
            _build_root(cfg)
        _set_limits(cfg["limits"])
        _drop_capabilities()
        _install_seccomp()
    except (SetupError, OSError) as exc:
        print(f"mpq sandbox: could not set up the sandbox: {exc}", file=sys.stderr)
        return 125
    os.closerange(3, 65536)
    return _run_job(cfg["argv"], cfg["env"], cfg["cwd"])


if __name__ == "__main__":
    sys.exit(main())
