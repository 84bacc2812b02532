"""A shutdown honours --shutdown-timeout whatever is stuck: a frame encoder that never
returns, or a disk that hangs while a job's end is written.  Run in a process of its own:
what is checked is that the process exits (Python joins its thread pools' threads at exit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import KEY

from animatediff_blender.backend.server.server import SHUTDOWN_GRACE_S

pytestmark = pytest.mark.timeout(120)

SHUTDOWN_TIMEOUT_S = 1.0

# argv: mode ("encoder" or "store"), data folder, key.  Prints "JOB <id>" once the job is
# stuck, then "STOPPED <seconds> <loop thread alive>" after Server.stop(), then exits.
SCRIPT = """
import logging, sys, threading, time
from pathlib import Path

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.config import ServerConfig
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, ClientConfig
from animatediff_blender.protocol.messages import GenerateRequest

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
mode, data, key, timeout = sys.argv[1], Path(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
config = ServerConfig(key=key, data_dir=data, bind="tcp://127.0.0.1:*", linger_ms=0, shutdown_timeout_s=timeout)
server = Server(config, FakeEngine())
never, reached = threading.Event(), threading.Event()
if mode == "encoder":  # a frame encoder that never returns
    def encode(frame, level):
        reached.set()
        never.wait()
    server.worker.encode = encode
else:  # the disk hangs while the job's end is written: SQLite's call never returns, holding the store's lock
    update = server.store.update
    def update_or_hang(job_id, **changes):
        if changes.get("state") == "finished":
            with server.store._lock:
                reached.set()
                never.wait()
        update(job_id, **changes)
    server.store.update = update_or_hang
endpoint = server.start()
client = BackendClient(ClientConfig(address=endpoint, key=key, client_id="artist-stuck", timeout_s=10))
job = client.submit(GenerateRequest(prompt="stuck", width=64, height=64, frames=4, steps=1, seed=1))
assert reached.wait(20)
print("JOB", job.job_id, flush=True)
client.close()
started = time.monotonic()
server.stop()
print("STOPPED", round(time.monotonic() - started, 2), server._thread.is_alive(), flush=True)
"""


@pytest.mark.parametrize("mode", ["encoder", "store"])
def test_a_stuck_encoder_or_store_write_does_not_hold_the_shutdown(tmp_path: Path, mode: str) -> None:
    cmd = [sys.executable, "-c", SCRIPT, mode, str(tmp_path / "data"), KEY.decode(), str(SHUTDOWN_TIMEOUT_S)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as exc:  # (the child is killed)
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the server process did not exit after its shutdown:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    job_id = lines["JOB"]
    seconds, loop_alive = lines["STOPPED"].split()
    # The timeout for the stuck work, a short grace for the server's own store writes.
    bound = SHUTDOWN_TIMEOUT_S + SHUTDOWN_GRACE_S + 2
    assert loop_alive == "False" and float(seconds) < bound, (lines, proc.stderr[-3000:])
    # One line says what was stuck, and which job may be left incomplete (and whose).
    stuck = [line for line in proc.stderr.splitlines() if "shutdown timeout" in line]
    assert len(stuck) == 1, proc.stderr[-3000:]
    assert f"job={job_id} client=artist-stuck" in stuck[0], stuck[0]
    assert ("encoder" if mode == "encoder" else "store") in stuck[0], stuck[0]


# A model rescan that never ends (hashing a checkpoint on a share that hangs): asked for,
# then the server stopped.  Prints "STOPPED <seconds>" and exits.
RESCAN_SCRIPT = """
import logging, sys, threading, time
from pathlib import Path

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.config import ServerConfig
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, ClientConfig

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
data, key = Path(sys.argv[1]), sys.argv[2].encode()
never, reached = threading.Event(), threading.Event()

class HangingScan(FakeEngine):
    def list_models(self, rescan=False):
        if rescan:
            reached.set()
            never.wait()
        return super().list_models()

config = ServerConfig(key=key, data_dir=data, bind="tcp://127.0.0.1:*", linger_ms=0, shutdown_timeout_s=1.0)
server = Server(config, HangingScan())
endpoint = server.start()
client = BackendClient(ClientConfig(address=endpoint, key=key, client_id="admin", timeout_s=10))
threading.Thread(target=lambda: client.list_models(rescan=True, timeout_s=30), daemon=True).start()
assert reached.wait(20)
started = time.monotonic()
server.stop()
print("STOPPED", round(time.monotonic() - started, 2), flush=True)
"""


def test_a_rescan_that_never_ends_does_not_hold_the_exit(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", RESCAN_SCRIPT, str(tmp_path / "data"), KEY.decode()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("the server process did not exit while a model rescan hung")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = float(proc.stdout.split("STOPPED", 1)[1].split()[0])
    assert seconds < SHUTDOWN_GRACE_S + 2, proc.stderr[-3000:]
    assert "model rescan was still reading the models folder" in proc.stderr, proc.stderr[-3000:]
