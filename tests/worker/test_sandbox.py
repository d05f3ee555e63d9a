"""Each guarantee of the job sandbox (README, "Security"), tested with hostile code run in it.

The hostile code is plain Python given to the child (``python -c``): whatever an uploaded model
could make the child do (through an unpickling hole, a TorchScript operator, a PyTorch bug),
Python can do at least as much, so what holds for it holds for the model. The job-level tests
run the real job entry point with one pipeline function replaced inside the child.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mpq_core
import worker.child_job
from tests.worker.conftest import Env
from tests.worker.test_jobs import _child_code, _processes_with
from worker.child_job import ChildJob, run_child_job
from worker.sandbox import (
    Isolation,
    SandboxLimits,
    SandboxOutcome,
    SandboxUnavailable,
    _readonly_paths,
    available_isolation,
    run_sandboxed,
)

REPO = Path(__file__).resolve().parents[2]


def _sandbox(
    tmp_path: Path, code: str, *, limits: SandboxLimits | None = None, name: str = "job"
) -> tuple[SandboxOutcome, list[dict[str, Any]]]:
    job_dir = tmp_path / name
    (job_dir / "input").mkdir(parents=True, exist_ok=True)
    (job_dir / "input" / "model.bin").write_bytes(b"the upload")
    messages: list[dict[str, Any]] = []
    outcome = run_sandboxed(
        ["-c", code],
        job_dir,
        limits=limits or SandboxLimits(wall_seconds=120),
        isolation=available_isolation(),
        on_message=messages.append,
    )
    return outcome, messages


def _report(tmp_path: Path, code: str) -> dict[str, Any]:
    """Run ``code`` (which fills a dict ``r``) in the sandbox and return ``r``."""
    prelude = "import json, os, socket, ctypes\nr = {}\n"
    outcome, messages = _sandbox(tmp_path, prelude + code + "\nprint(json.dumps(r))")
    assert outcome.exit_code == 0, outcome.stderr_tail
    return messages[-1]


def test_this_host_gives_jobs_namespaces() -> None:
    # CI runs on a host with user namespaces; the guarantees below are those of this level.
    assert available_isolation() is Isolation.NAMESPACES


def test_the_environment_and_the_process_table_hold_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "MPQ_DATABASE_URL": "postgresql://mpq:hunter2-db@db/mpq",
        "MPQ_S3_SECRET_KEY": "s3-secret-e8d1c9",
        "MPQ_API_KEY_PEPPER": "pepper-77f0a2",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    r = _report(
        tmp_path,
        "r['env'] = dict(os.environ)\n"
        "blobs = []\n"
        "for pid in os.listdir('/proc'):\n"
        "    for f in ('environ', 'cmdline'):\n"
        "        try: blobs.append(open(f'/proc/{pid}/{f}', 'rb').read().decode('latin-1'))\n"
        "        except OSError: pass\n"
        "r['proc'] = '\\n'.join(blobs)\n",
    )
    assert not [k for k in r["env"] if k.startswith("MPQ_")]
    for value in secrets.values():
        assert value not in json.dumps(r["env"]) and value not in r["proc"]


def test_reads_outside_the_job_folder_fail(tmp_path: Path) -> None:
    neighbour = tmp_path / "other-job" / "input"
    neighbour.mkdir(parents=True)
    (neighbour / "data.npz").write_bytes(b"another tenant's data")
    targets = [
        str(neighbour / "data.npz"),
        str(Path(__file__).resolve()),  # the service's own source tree
        str(Path(worker.child_job.__file__).resolve()),
        "/etc/shadow",
        "/etc/hostname",
        str(Path.home() / ".bash_history"),
    ]
    r = _report(
        tmp_path,
        f"targets = {targets!r}\n"
        "for t in targets:\n"
        "    try:\n"
        "        open(t, 'rb').read(10); r[t] = 'read'\n"
        "    except OSError as e:\n"
        "        r[t] = type(e).__name__\n"
        "import torch\n"  # the working exploit's operator, through PyTorch
        "try:\n"
        f"    torch.from_file({targets[0]!r}, size=4, dtype=torch.uint8); r['from_file'] = 'read'\n"
        "except RuntimeError as e:\n"
        "    r['from_file'] = str(e)[:100]\n"
        "r['root'] = sorted(os.listdir('/'))\n"
        "r['upload'] = open('/job/input/model.bin', 'rb').read().decode()\n",
    )
    for target in targets:
        assert r[target] in ("FileNotFoundError", "PermissionError"), (target, r[target])
    assert r["from_file"] != "read"
    assert r["upload"] == "the upload"
    # Nothing of the host's top level but system folders, the job's, and the first component of
    # each folder the sandbox binds for the interpreter and mpq's code (wherever the checkout is).
    bound = {Path(p).parts[1] for p in _readonly_paths([], tmp_path / "job")}
    assert set(r["root"]) <= bound | {
        "bin", "lib", "lib32", "lib64", "libx32", "sbin", "usr", "etc", "dev", "tmp", "proc",
        "sys", "job",
    }  # fmt: skip
    assert "mpq-data" not in json.dumps(r["root"])


def test_inputs_are_read_only_and_only_out_is_writable(tmp_path: Path) -> None:
    r = _report(
        tmp_path,
        "for t in ('/job/input/model.bin', '/job/input/new', '/usr/evil', '/job/out/ok'):\n"
        "    try:\n"
        "        open(t, 'wb').write(b'x'); r[t] = 'written'\n"
        "    except OSError as e:\n"
        "        r[t] = type(e).__name__\n",
    )
    assert r["/job/input/model.bin"] != "written" and r["/job/input/new"] != "written"
    assert r["/usr/evil"] != "written"
    assert r["/job/out/ok"] == "written"
    assert (tmp_path / "job" / "input" / "model.bin").read_bytes() == b"the upload"
    assert (tmp_path / "job" / "out" / "ok").read_bytes() == b"x"


def test_read_only_paths_below_tmp_stay_visible(tmp_path: Path) -> None:
    # A virtual environment under /tmp (a CI checkout, say) must not be hidden by the job's
    # private /tmp.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "shared.txt").write_text("visible")
    job_dir = tmp_path / "job"
    (job_dir / "input").mkdir(parents=True)
    messages: list[dict[str, Any]] = []
    outcome = run_sandboxed(
        [
            "-c",
            f"import json; print(json.dumps({{'r': open({str(lib / 'shared.txt')!r}).read()}}))",
        ],
        job_dir,
        limits=SandboxLimits(wall_seconds=60),
        isolation=available_isolation(),
        on_message=messages.append,
        extra_readonly=[lib],
    )
    assert outcome.exit_code == 0, outcome.stderr_tail
    assert messages == [{"r": "visible"}]


def test_the_job_imports_the_engine_the_worker_imports(tmp_path: Path) -> None:
    # A worker whose mpq_core is another copy than the installed one (a second checkout on
    # PYTHONPATH, beside an editable install): the job must import the copy the sandbox shows.
    copy = tmp_path / "engine_copy"
    shutil.copytree(
        Path(mpq_core.__file__).parent,
        copy / "mpq_core",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    job_dir = tmp_path / "job"
    (job_dir / "input").mkdir(parents=True)
    code = (
        "import json\n"
        "from pathlib import Path\n"
        "from worker.sandbox import SandboxLimits, available_isolation, run_sandboxed\n"
        "found = []\n"
        "run_sandboxed(['-c', 'import json, mpq_core; print(json.dumps({\"f\": mpq_core.__file__}))'],\n"
        f"    Path({str(job_dir)!r}), limits=SandboxLimits(wall_seconds=60),\n"
        "    isolation=available_isolation(), on_message=found.append)\n"
        "print(json.dumps(found))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,  # not the checkout: `python -c` puts its folder first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 1, done.stderr
    assert Path(found[0]["f"]).is_relative_to(copy), found


def test_a_job_folder_inside_a_shown_path_is_refused(tmp_path: Path) -> None:
    job_dir = tmp_path / "lib" / "work" / "job"
    (job_dir / "input").mkdir(parents=True)
    with pytest.raises(SandboxUnavailable, match="keep MPQ_DATA_DIR outside"):
        run_sandboxed(
            ["-c", "pass"],
            job_dir,
            limits=SandboxLimits(wall_seconds=60),
            isolation=available_isolation(),
            extra_readonly=[tmp_path / "lib"],
        )


def test_the_network_is_unreachable(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    r = _report(
        tmp_path,
        f"for host, port in (('127.0.0.1', {port}), ('127.0.0.1', 5432), ('8.8.8.8', 53)):\n"
        "    try:\n"
        "        s = socket.create_connection((host, port), timeout=3); r[host + str(port)] = 'up'\n"
        "    except OSError as e:\n"
        "        r[host + str(port)] = type(e).__name__\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r['udp'] = 'made'\n"
        "except OSError as e:\n"
        "    r['udp'] = type(e).__name__\n",
    )
    assert all(v != "up" for v in r.values()), r
    assert r["udp"] == "PermissionError"
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected
    listener.close()


def test_the_job_has_no_privileges(tmp_path: Path) -> None:
    r = _report(
        tmp_path,
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines()"
        " if ':\\t' in l)\n"
        "r.update({k: status[k].strip() for k in ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs', "
        "'Seccomp')})\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r['unshare'] = libc.unshare(0x10000000)\n"  # CLONE_NEWUSER
        "r['mount'] = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n",
    )
    assert r["CapEff"] == r["CapPrm"] == r["CapBnd"] == "0000000000000000"
    assert (r["NoNewPrivs"], r["Seccomp"]) == ("1", "2")
    assert r["unshare"] == -1 and r["mount"] == -1


def test_the_wall_clock_limit_kills_the_whole_process_tree(tmp_path: Path) -> None:
    token = f"mpq-sandbox-tree-{os.getpid()}"
    code = (
        "import subprocess, time\n"
        f"subprocess.Popen(['/usr/bin/sleep', '600', {token!r}], start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    outcome, _ = _sandbox(tmp_path, code, limits=SandboxLimits(wall_seconds=3))
    assert outcome.stopped == "deadline"
    assert _processes_with(token) == []


def test_the_cpu_time_limit_kills_the_child(tmp_path: Path) -> None:
    outcome, _ = _sandbox(
        tmp_path, "while True: pass", limits=SandboxLimits(wall_seconds=120, cpu_seconds=1)
    )
    assert outcome.signal == signal.SIGXCPU


def test_the_memory_limit_refuses_the_allocation(tmp_path: Path) -> None:
    code = (
        "import json\n"
        "try:\n    bytearray(3 * 2**30); r = 'allocated'\n"
        "except MemoryError:\n    r = 'MemoryError'\n"
        "print(json.dumps({'r': r}))\n"
    )
    outcome, messages = _sandbox(
        tmp_path, code, limits=SandboxLimits(wall_seconds=120, memory_bytes=1 << 30)
    )
    assert outcome.exit_code == 0 and messages == [{"r": "MemoryError"}]


# The same guarantees end to end: the job fails with a specific code.


def _job_with(env: Env, monkeypatch: pytest.MonkeyPatch, body: str) -> Any:
    monkeypatch.setattr(worker.child_job, "CHILD_ARGV", _child_code(body))
    return env.run_job(env.create_job())


def test_a_job_past_its_memory_limit_fails_with_memory_limit_exceeded(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(sandbox_memory_bytes=3 * 2**30)
    job = _job_with(
        env,
        monkeypatch,
        "import torch, mpq_core.pipeline as p\n"
        "p.allocate = lambda *a, **k: torch.ones(2**31, dtype=torch.float32)",
    )
    assert (job.status, job.error_code) == ("failed", "memory_limit_exceeded")
    assert "3.0 GiB" in job.error_message


def test_a_job_past_its_cpu_limit_fails_with_cpu_time_limit_exceeded(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(sandbox_cpu_seconds=1)
    job = _job_with(env, monkeypatch, "while True: pass")
    assert (job.status, job.error_code) == ("failed", "cpu_time_limit_exceeded")


def test_a_job_past_its_time_limit_fails_with_time_limit_exceeded(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(job_time_limit_s=6)
    job = _job_with(env, monkeypatch, "import time\ntime.sleep(600)")
    assert (job.status, job.error_code) == ("failed", "time_limit_exceeded")


def test_a_crashing_job_fails_with_job_crashed(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job_with(env, monkeypatch, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (job.status, job.error_code) == ("failed", "job_crashed")
    assert "SIGSEGV" in job.error_message


def test_a_link_left_as_an_artefact_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child points its "model.pt" at a host file; the worker must not upload that file.
    secret = tmp_path / "host-secret.txt"
    secret.write_text("the worker's secret")
    job_dir = tmp_path / "job"
    (job_dir / "input").mkdir(parents=True)
    code = (
        "import json, os\n"
        "os.makedirs('/job/out/artifacts')\n"
        f"os.symlink({str(secret)!r}, '/job/out/artifacts/model.pt')\n"
        "json.dump({'report': {}, 'artifacts': {'model.pt': 'artifacts/model.pt'}},"
        " open('/job/out/result.json', 'w'))\n"
    )
    monkeypatch.setattr(worker.child_job, "CHILD_ARGV", ("-c", code))
    with pytest.raises(worker.child_job.MpqError) as caught:
        run_child_job(
            ChildJob(spec={}, model="model.bin", data="data.npz"),
            job_dir,
            limits=SandboxLimits(wall_seconds=60),
            isolation=available_isolation(),
            on_progress=lambda stage, fraction: None,
            tick=lambda: None,
        )
    assert caught.value.code == "job_output"
    assert not (job_dir / "staging" / "model.pt").exists() or (
        (job_dir / "staging" / "model.pt").read_text() != "the worker's secret"
    )


def test_the_sandbox_init_imports_only_the_standard_library() -> None:
    # It runs before the job with the job's environment; it must not drag in the service.
    code = (
        "import sys, worker.sandbox_init\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'sqlalchemy', 'celery', 'mpq_service', 'api', 'boto3', 'mpq_core')]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_worker_process_never_imports_torch() -> None:
    code = "import sys, worker.jobs, worker.tasks, worker.child_job\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
