"""The background thread that owns the backend connection.

Blender's main thread never calls the client: it puts commands on `Worker.inbox` and a
timer (`timer.py`) drains the messages this thread puts on the outbox.  ZeroMQ sockets
are not thread-safe, so this thread is the only one that touches the socket.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from . import messages as m

POLL_S = 0.1  # how long one poll waits for an event
SILENCE_CHECK_S = 4.0  # ask the backend for the job states after this long without events
QUEUE_VIEW_S = 5.0  # how often the backend's queue is asked for while our jobs are on it
QUEUE_VIEW_LINES = 8
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 15.0
# ClientError codes that mean "the connection is bad", not "the request was refused".
CONNECTION_CODES = {"", "timeout", "connection", "protocol", "bad_signature", "corrupt", "version", "auth",
                    "unauthorized"}  # (a CurveZMQ certificate taken away while connected)
# Of those, the ones after which a submit may have reached the backend without its answer
# coming back: it is sent again (same submit id), not reported refused.
RESEND_CODES = {"timeout", "connection"}
TOLD_WHEN_BACK = "the backend could not be reached and is told when it is back"
SUBMIT_ID = re.compile(r"^[0-9a-f]{32}\Z")  # a job row's local_id (uuid4 hex) is its submit id


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Read a field of a msgspec Struct or a dict alike."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _to_builtins(obj: Any) -> Any:
    try:
        import msgspec

        return msgspec.to_builtins(obj)
    except Exception:  # noqa: BLE001 - best effort, only for display/storage
        return obj if isinstance(obj, dict) else {}


def make_client(config: dict[str, Any]) -> Any:
    BackendClient = _protocol_client().BackendClient  # noqa: N806 - a class
    return BackendClient(client_config(config))


def _protocol_client() -> Any:
    """`protocol.client`, or an error that says which pyzmq / msgspec got in the way.  The
    extension bundles its own; Blender keeps one copy of each package for all extensions
    (the highest version any of them bundles), and a PYTHONPATH or site-packages copy can
    come first: a bare "No module named 'zmq.auth'" told an artist nothing."""
    try:
        from .protocol import client
    except ImportError as exc:
        raise RuntimeError(bundled_import_problem(exc)) from exc
    return client


def bundled_import_problem(exc: BaseException) -> str:
    bundled = {}
    manifest = Path(__file__).with_name("blender_manifest.toml")
    try:  # the wheels this build bundles, by their names: ./wheels/pyzmq-27.3.0-cp311-....whl
        for name, version in re.findall(r"/(pyzmq|msgspec)-([0-9][^-]*)-", manifest.read_text(encoding="utf-8")):
            bundled[name] = version
    except OSError:
        pass
    loaded = []
    for module, name in (("zmq", "pyzmq"), ("msgspec", "msgspec")):
        try:
            mod = __import__(module)
            where = os.path.dirname(getattr(mod, "__file__", "") or "") or "?"
            loaded.append(f"{name} {getattr(mod, '__version__', '?')} from {where}")
        except Exception:  # noqa: BLE001 - broken in another way: the error above says how
            loaded.append(f"{name}: not importable")
    expected = ", ".join(f"{n} {v}" for n, v in sorted(bundled.items())) or "its own pyzmq and msgspec"
    return (f"the extension's libraries could not be loaded ({exc}). It bundles {expected}; this Blender "
            f"loaded {'; '.join(loaded)}. Another add-on bundling a different version, or a PYTHONPATH / "
            f"site-packages copy, takes their place: remove that copy, or ask your TD")


def client_config(config: dict[str, Any]) -> Any:
    protocol_client = _protocol_client()
    ClientConfig, client_name = protocol_client.ClientConfig, protocol_client.client_name  # noqa: N806

    known = {k: v for k, v in config.items() if k in ClientConfig.__dataclass_fields__}
    if known.get("client_name"):  # who runs it where: the backend's queue listing shows it
        known["client_name"] = client_name(known["client_name"])
    for key in ("key_file", "server_public_key_file", "client_secret_key_file"):
        if known.get(key):  # "~/keys/hmac.key" as a TD deploys it to every machine
            known[key] = Path(os.path.expandvars(os.path.expanduser(str(known[key]))))
    return ClientConfig(**known)


def describe_welcome(welcome: Any) -> str:
    models = list(_get(welcome, "models", []) or [])
    usable = sum(1 for x in models if _get(x, "ok", True))
    text = (f"backend {_get(welcome, 'server_version', '?')} on {_get(welcome, 'device', '') or 'unknown device'}, "
            f"{len(models)} models ({usable} usable)")
    if _get(welcome, "warming_up", False):
        text += ", warming up"
    return text


RESCAN_WAIT_S = 60.0  # ⟳'s wait for the backend to read its models folder again


def size_hint(fields: Any, given: Any = (), api: bool = False, panel: dict[str, str] | None = None) -> str:
    """Words to add to a refusal of the size or length: for the panel, the setting that sets
    it (`panel`: field -> words, from `settings.Plan.panel_hints`); for a script, the keyword
    it left out (not in `given`).  "" when no such field was refused."""
    refused = {str(getattr(f, "field", "")).rsplit(".", 1)[-1] for f in fields or ()}
    names = [n for n in ("width", "height", "frames") if n in refused]
    if api:
        names = [n for n in names if n not in given]
        if not names:
            return ""
        return (f" (without {', '.join(f'{n}=' for n in names)} the AnimateDiff panel's size and length are "
                "used; pass smaller ones)")
    words = [panel[n] for n in names if panel and n in panel]
    return " -- in the AnimateDiff panel: " + "; ".join(dict.fromkeys(words)) if words else ""


def error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 400 else text[:400] + "..."


def test_connection(config: dict[str, Any], outbox: queue.Queue[Any]) -> threading.Thread:
    """Connect once in a throw-away thread and report what the backend says."""

    def run() -> None:
        client = None
        try:
            client = make_client(config)
            welcome = client.connect()
            outbox.put(m.TestResult(True, describe_welcome(welcome)))
            outbox.put(_connection_state(True, welcome))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message for the user
            outbox.put(m.TestResult(False, f"{config.get('address', '?')}: {error_text(exc)}"))
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass

    t = threading.Thread(target=run, name="animatediff-test-connection", daemon=True)
    t.start()
    return t


def _connection_state(ok: bool, welcome: Any) -> m.ConnectionState:
    return m.ConnectionState(
        connected=ok,
        message=describe_welcome(welcome),
        models=[_to_builtins(x) for x in (_get(welcome, "models", []) or [])],
        defaults=dict(_get(welcome, "defaults", {}) or {}),
        server_version=str(_get(welcome, "server_version", "")),
        device=str(_get(welcome, "device", "")),
    )


# The request's model fields, with the kind a bare file name given for each stands for.
MODEL_FIELDS = {"base_model": "base", "motion_module": "motion", "domain_adapter": "adapter"}


def typed_model_id(value: Any, kind: str) -> Any:
    """A model as a script or shot list names it -> its id, as the CLI maps it
    (`protocol.messages.model_id`: "Realistic Vision V5.1.safetensors" -> the id the backend
    lists the file under).  What is no string is left for the protocol's check to refuse."""
    from .protocol.messages import model_id

    return model_id(value, kind) if isinstance(value, str) and value else value


def resolve_request(request: dict[str, Any], camera_motions: dict[str, float], models: Any) -> Any:
    """A GenerateRequest from the panel's fields; camera motions ("ZoomIn") become the ids
    of the backend's MotionLoRAs for them.  ValueError says what is wrong, in words."""
    import msgspec

    from .protocol.messages import GenerateRequest

    request = dict(request)
    for key, kind in MODEL_FIELDS.items():
        request[key] = typed_model_id(request.get(key), kind)
    loras = [dict(x, id=typed_model_id(x["id"], "lora")) if isinstance(x, dict) and "id" in x else x
             for x in request.get("motion_loras") or []]
    models = list(models or [])
    for motion, weight in camera_motions.items():
        match = [x for x in models if _get(x, "kind") == "lora" and _get(x, "camera_motion") == motion
                 and _get(x, "ok", True)]
        if not match:
            raise ValueError(f"the backend has no usable MotionLoRA for camera motion {motion}")
        loras.append({"id": _get(match[0], "id"), "weight": float(weight)})
    request["motion_loras"] = loras
    try:
        return msgspec.convert(request, GenerateRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid settings: {exc}") from exc


def check_request(request: dict[str, Any], camera_motions: dict[str, float]) -> Any:
    """`resolve_request` before the backend's model list is known (a batch validating its
    shots, a script before it connects): each camera motion stands for a MotionLoRA of the
    same name, so that its weight is checked against the protocol's range too."""
    stand_ins = [{"kind": "lora", "camera_motion": name, "id": "lora:camera_motion"} for name in camera_motions]
    return resolve_request(request, camera_motions, stand_ins)


def queue_lines(listing: Any, limit: int = QUEUE_VIEW_LINES) -> tuple[str, list[str]]:
    """A `JobList` as the panel shows it: a summary and a line per job ("now  anna@ws-12  16
    frames 512x512  step 12/25", "2.  you  64 frames 680x384"); of a client name only its
    user@host part where it has one ("blender 4.5.15 anna@ws-12")."""
    jobs = list(_get(listing, "jobs", None) or [])
    running = sum(1 for j in jobs if _get(j, "state") == "running")
    clients = int(_get(listing, "clients", 0) or 0)
    summary = f"{running} running, {len(jobs) - running} waiting"
    if jobs:
        summary += f", {clients} client{'' if clients == 1 else 's'}"
    lines = []
    for job in jobs[:limit]:
        position = int(_get(job, "position", 0) or 0)
        name = str(_get(job, "client", ""))
        last = name.rsplit(" ", 1)[-1]
        who = "you" if _get(job, "mine", False) else (last if "@" in last else name)[:40]
        line = (f"{f'{position}.' if position else 'now'}  {who}  "
                f"{_get(job, 'frames', 0)} frames {_get(job, 'width', 0)}x{_get(job, 'height', 0)}")  # fmt: skip
        if _get(job, "state") == "running":
            step, total = int(_get(job, "step", 0) or 0), int(_get(job, "total_steps", 0) or 0)
            line += f"  step {step}/{total}" if 0 < total and step < total else "  saving" if total else "  starting"
        lines.append(line)
    if len(jobs) > limit:
        lines.append(f"... and {len(jobs) - limit} more")
    return summary, lines


@dataclass
class Track:
    out_root: str
    frames: dict[int, bytes] = field(default_factory=dict)
    preview_path: str = ""
    # What the job's row knows, for a take found on disk once the backend has forgotten the
    # job (`_gone`): its frame count (0: not known) and its request (its seed, its settings).
    expected: int = 0
    request: dict[str, Any] = field(default_factory=dict)


def watch_entry(out_root: str, frames: int = 0, request_json: str = "") -> dict[str, Any]:
    """A `WatchJobs` value that tells the worker what the job's row knows besides the folder
    its take goes under (a bare folder, a str, is a value too): the row's frame count and
    its `request_json`.  With them, a take found on disk after the backend forgot the job is
    checked frame for frame and placed with the row's seed and settings."""
    return {"out_root": out_root, "frames": frames, "request_json": request_json}


def _watched_track(value: Any) -> Track:
    """A Track from a `WatchJobs` value: the output folder, or a `watch_entry`."""
    if not isinstance(value, dict):
        return Track(str(value))
    frames = value.get("frames", 0)
    frames = frames if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else 0
    request: Any = {}
    try:
        request = json.loads(value.get("request_json") or "{}").get("request", {})
    except (ValueError, AttributeError):
        pass
    return Track(str(value.get("out_root", "")), expected=frames, request=request if isinstance(request, dict) else {})


def take_on_disk(out_root: str, job_id: str, expected: int = 0) -> tuple[Path, list[str], bool]:
    """The job's folder (`files.job_dir`), the frame names of its take found there (each a
    PNG), and whether they are the whole take: `expected` frames when the row's count is
    known, else an unbroken run from frame 0 (the worker puts a take in place in one step,
    so a folder holding one has all of it, unless frames were deleted since)."""
    folder = files.job_dir(out_root, job_id)
    try:
        present = {entry.name for entry in os.scandir(folder) if entry.is_file()}
    except OSError:
        return folder, [], False
    found = sorted(i for i in (int(match.group(1)) for match in map(files.FRAME_FILE.match, present) if match)
                   if files.FRAME_NAME.format(i) in present and (expected <= 0 or i < expected)
                   and _is_png(folder / files.FRAME_NAME.format(i)))
    count = expected if expected > 0 else len(found)
    names = files.frame_names(count)
    complete = count > 0 and found[:count] == list(range(count))
    return folder, names if complete else [files.FRAME_NAME.format(i) for i in found], complete


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == files.PNG_MAGIC
    except OSError:
        return False


class Worker(threading.Thread):
    def __init__(self, outbox: queue.Queue[Any], config: dict[str, Any]) -> None:
        super().__init__(name="animatediff-worker", daemon=True)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.outbox = outbox
        self.config = dict(config)
        self.client: Any = None
        self.welcome: Any = None
        self.jobs: dict[str, Track] = {}
        self.waiting: list[m.SubmitJob] = []  # submits queued until connected
        self.waiting_cancels: set[str] = set()
        self.want_connection = True
        self.next_connect = 0.0
        self.backoff = RECONNECT_MIN_S
        self.last_heard = time.monotonic()
        self.next_queue_view = 0.0
        self.queue_view_shown = False
        self.preview_dir = files.preview_folder()
        self._halt = threading.Event()
        self._in_hand: Any = None  # the command being carried out

    # ------------------------------------------------------------ public (any thread)

    def send(self, command: Any) -> None:
        self.inbox.put(command)

    def stop(self, timeout: float = 2.0) -> None:
        self._halt.set()
        self.inbox.put(m.Shutdown())
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    # ------------------------------------------------------------ thread

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._commands(block=self.client is None)
                if self._halt.is_set():
                    break
                if self.client is None:
                    if self._needs_connection() and time.monotonic() >= self.next_connect:
                        self._connect()
                    continue
                try:
                    self._pump()
                    self._queue_view()
                except Exception as exc:  # noqa: BLE001 - the thread must outlive any bug or peer
                    self._lost(exc)
        finally:
            self._drop_client()
            self._hand_on_cancels()
            self._remove_previews()

    def _hand_on_cancels(self) -> None:
        """As the thread ends (the add-on is disabled): cancels the artist asked for that it had
        no time to send end their rows here, as for a backend that cannot be reached, and
        every cancel still owed goes to the main thread (`CancelsOwed`) for the next worker."""
        while True:
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, m.CancelJob):
                self._cancel_offline(cmd.job_id, "the add-on stopped first; the backend is told when it runs again")
            elif isinstance(cmd, m.CancelSubmit):
                self._cancel_submit(cmd.local_id)
            elif isinstance(cmd, m.CancelsOwed):
                self._owe(cmd)
            # Anything else is the next worker's: submits are sent again from the rows, jobs
            # watched again from the scenes.
        owed = self.owed_now()  # the inbox is empty now: what the lists hold
        if not owed.is_empty():
            self.outbox.put(dataclasses.replace(owed, sender=self))

    def owed_now(self) -> m.CancelsOwed:
        """From another thread, at a quit (the thread may still run): the cancels owed to the
        backend so far, with the one being sent (it waits on an absent backend) and those still
        in the inbox (`owed.save` keeps them for the next session).  A copy taken while the
        thread changes its lists is taken again."""
        for _attempt in range(5):
            try:
                in_hand = self._in_hand
                job_ids = set(self.waiting_cancels)
                waiting = list(self.waiting)
                inbox = [in_hand, *self.inbox.queue]
                break
            except RuntimeError:  # changed size during the copy
                continue
        else:
            return m.CancelsOwed([], [])
        submits = [sub for sub in waiting if sub.cancelled]
        for cmd in inbox:
            if isinstance(cmd, m.CancelJob):
                job_ids.add(cmd.job_id)
            elif isinstance(cmd, m.CancelsOwed):
                job_ids.update(cmd.job_ids)
                submits.extend(cmd.submits)
            elif isinstance(cmd, m.CancelSubmit):
                # Only one that may have reached the backend is owed (as in _cancel_submit).
                submits.extend(dataclasses.replace(sub, cancelled=True) for sub in waiting
                               if sub.local_id == cmd.local_id and sub.resend and not sub.cancelled)
        return m.CancelsOwed(sorted(job_ids), submits)

    def _remove_previews(self) -> None:
        """As the thread ends (the add-on is disabled): the previews of jobs still running go,
        and so does the folder (at a quit, `files.remove_preview_folder` runs instead)."""
        for track in self.jobs.values():
            if track.preview_path:
                _remove(track.preview_path)
                track.preview_path = ""
        try:
            os.rmdir(self.preview_dir)
        except OSError:
            pass  # never made, or holds a file this thread did not write

    def _needs_connection(self) -> bool:
        # An owed cancel counts: the job may still hold a shared GPU until the backend hears of it.
        return self.want_connection or bool(self.jobs) or bool(self.waiting) or bool(self.waiting_cancels)

    def _commands(self, block: bool) -> None:
        timeout = 0.2 if block else 0.0
        while True:
            try:
                cmd = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            self._in_hand = cmd  # (owed_now: a cancel being sent is in no list yet)
            try:
                self._command(cmd)
            finally:
                self._in_hand = None

    def _command(self, cmd: Any) -> None:
        if isinstance(cmd, m.Shutdown):
            self._halt.set()
        elif isinstance(cmd, m.Configure):
            if cmd.config != self.config:
                self.config = dict(cmd.config)
                self._drop_client()
                self.next_connect = 0.0
                self.backoff = RECONNECT_MIN_S
        elif isinstance(cmd, m.RefreshModels):
            self.want_connection = True
            self.next_connect = 0.0
            if self.client is not None:
                self._refresh_models()
        elif isinstance(cmd, m.SubmitJob):
            if self.client is None:
                self.waiting.append(cmd)
                self.next_connect = min(self.next_connect, time.monotonic())
            else:
                self._submit(cmd)
        elif isinstance(cmd, m.CancelJob):
            if self.client is None:
                self._connect()  # now, whatever the backoff: the artist waits for an answer
            if self.client is not None:
                self._guard(lambda: self.client.cancel(cmd.job_id))
            if self.client is None:
                # Unreachable (or lost during the cancel): waiting for the backend could last
                # forever and the job could never be cleared.  End it here; the backend is
                # told as soon as it answers again (the worker keeps trying).
                self._cancel_offline(cmd.job_id)
        elif isinstance(cmd, m.CancelSubmit):
            self._cancel_submit(cmd.local_id)
        elif isinstance(cmd, m.CancelsOwed):
            self._owe(cmd)
            if self.client is not None:
                self._send_owed()
        elif isinstance(cmd, m.WatchJobs):
            for job_id, value in cmd.jobs.items():
                track = _watched_track(value)
                known = self.jobs.setdefault(job_id, track)
                if known is not track and not known.expected:  # watched again, now with the row's
                    known.expected, known.request = track.expected, track.request
            if self.client is not None:
                self._watch(list(cmd.jobs))
        elif isinstance(cmd, m.MoveTake):
            self._move(cmd)

    def _cancel_offline(self, job_id: str, why: str = TOLD_WHEN_BACK) -> None:
        """Cancel a job the backend cannot be told of now: its row ends; the cancel is owed."""
        self.waiting_cancels.add(job_id)
        self._end(job_id, m.JobFailed(job_id, f"cancelled; {why}", "cancelled"))

    def _owe(self, owed: m.CancelsOwed) -> None:
        self.waiting_cancels.update(owed.job_ids)
        self.waiting.extend(owed.submits)

    def _cancel_submit(self, local_id: str) -> None:
        """A submit still waiting here ends now, as cancelled.  One that may have reached the
        backend (`resend`) stays owed: sent again once the backend answers, its job is
        cancelled there.  A submit answered meanwhile is not here: its row cancels the job
        when the acceptance reaches it."""
        sub = next((x for x in self.waiting if x.local_id == local_id and not x.cancelled), None)
        if sub is None:
            return
        self.waiting.remove(sub)
        if sub.resend:
            self.waiting.append(dataclasses.replace(sub, cancelled=True))
        self.outbox.put(m.JobRejected(
            local_id, "cancelled" + (f"; {TOLD_WHEN_BACK}" if sub.resend else ""), "cancelled"))

    # ------------------------------------------------------------ connection

    def _connect(self) -> None:
        try:
            client = make_client(self.config)
            welcome = client.connect()
        except Exception as exc:  # noqa: BLE001
            reason = error_text(exc)
            self.outbox.put(m.ConnectionState(False, f"cannot connect to {self.config.get('address', '?')}: {reason}"))
            for job_id in self.jobs:
                self.outbox.put(m.JobNote(job_id, f"backend unreachable ({reason}); retrying"))  # still owed
            now = time.monotonic()
            for sub in self.waiting:
                if sub.cancelled:
                    continue  # its row has ended; owed to the backend only
                if sub.resend:  # may exist on the backend: owed until it answers
                    self.outbox.put(m.SubmitNote(sub.local_id, f"backend unreachable ({reason}); retrying"))
                elif now < sub.patient_until:
                    self.outbox.put(m.SubmitNote(sub.local_id, f"waiting for the local backend to start ({reason})"))
                else:
                    self.outbox.put(m.JobRejected(sub.local_id, f"cannot connect to the backend: {reason}"))
            self.waiting = [sub for sub in self.waiting if sub.resend or now < sub.patient_until]
            # Retry (with back-off) only while jobs or cancels are owed; otherwise wait for the
            # next request (Refresh, Generate).
            self.want_connection = False
            self.next_connect = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)
            return
        self.client, self.welcome = client, welcome
        self.want_connection = False
        self.backoff = RECONNECT_MIN_S
        self.last_heard = time.monotonic()
        self.outbox.put(_connection_state(True, welcome))
        if self.jobs:
            self._watch(list(self.jobs))
        self._send_owed()

    def _send_owed(self) -> None:
        """Send what waited for a connection: owed cancels, then submits.  Whatever the
        connection, lost again meanwhile, did not take waits for the next one."""
        cancels, self.waiting_cancels = sorted(self.waiting_cancels), set()
        for i, job_id in enumerate(cancels):
            if self.client is None:
                self.waiting_cancels.update(cancels[i:])
                break
            self._guard(lambda j=job_id: self.client.cancel(j))
            if self.client is None:  # lost during this cancel: it may not have arrived
                self.waiting_cancels.add(job_id)
        waiting, self.waiting = self.waiting, []
        for i, sub in enumerate(waiting):
            if self.client is None:
                self.waiting.extend(waiting[i:])
                break
            self._submit(sub)

    def _drop_client(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
        self.client = None

    def _lost(self, exc: BaseException) -> None:
        reason = error_text(exc)
        self._drop_client()
        self.outbox.put(m.ConnectionState(False, f"lost the backend: {reason}"))
        for job_id in self.jobs:
            self.outbox.put(m.JobNote(job_id, f"lost the backend ({reason}); reconnecting"))
        self.next_connect = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)

    def _guard(self, fn: Any, job_ids: list[str] | None = None) -> Any:
        """Run one client call.  A connection-level failure drops the client (the jobs
        are asked for again after the reconnect); a refusal of the request itself ends
        the jobs it was about, with the backend's words."""
        from .protocol.client import ClientError

        try:
            return fn()
        except ClientError as exc:
            if getattr(exc, "code", "") in CONNECTION_CODES:
                self._lost(exc)
            else:
                for job_id in job_ids or []:
                    why = f"backend refused: {error_text(exc)}"
                    if getattr(exc, "code", "") == "not_found":  # e.g. its frames expired meanwhile
                        self._gone(job_id, why)
                    else:
                        self._end(job_id, m.JobFailed(job_id, why))
        except Exception as exc:  # noqa: BLE001 - never let the worker thread die
            self._lost(exc)
        return None

    def _refresh_models(self) -> None:
        from .protocol.client import ClientError

        try:
            welcome = self.client.connect() if not hasattr(self.client, "list_models") else None
            if welcome is None:
                # ⟳: files dropped into the backend's models folder appear (it reads the folder
                # again; a new checkpoint is hashed first, which may take a while).
                try:
                    models = self.client.list_models(rescan=True, timeout_s=RESCAN_WAIT_S)
                except ClientError as exc:
                    if getattr(exc, "code", "") != "timeout":
                        raise
                    self.outbox.put(m.ConnectionState(
                        True, "the backend is still reading its models folder (new checkpoints are hashed "
                        "first): ⟳ again in a minute"))
                    return
                self.outbox.put(m.ConnectionState(
                    True, describe_welcome({"models": models, "server_version": _get(self.welcome, "server_version"),
                                            "device": _get(self.welcome, "device")}),
                    models=[_to_builtins(x) for x in models], defaults=dict(_get(self.welcome, "defaults", {}) or {}),
                    server_version=str(_get(self.welcome, "server_version", "")),
                    device=str(_get(self.welcome, "device", ""))))
            else:
                self.welcome = welcome
                self.outbox.put(_connection_state(True, welcome))
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)

    # ------------------------------------------------------------ jobs

    def _submit(self, sub: m.SubmitJob) -> None:
        from .protocol.client import ClientError

        try:
            req = resolve_request(sub.request, sub.camera_motions, _get(self.welcome, "models", []))
        except ValueError as exc:
            self._tell_row(sub, m.JobRejected(sub.local_id, str(exc)))
            return
        submit_id = sub.local_id if SUBMIT_ID.match(sub.local_id) else None
        try:
            accepted = self.client.submit(req, client_tag=sub.client_tag, submit_id=submit_id)
        except ClientError as exc:
            code = getattr(exc, "code", "")
            if code in RESEND_CODES and submit_id is not None:
                # No answer: the backend may have made the job all the same.  Sent again, the
                # same request with the same submit id, once connected: the backend then
                # answers with that job instead of making a second one.
                self.waiting.append(dataclasses.replace(
                    sub, request=_to_builtins(req), camera_motions={}, resend=True))
                self._tell_row(sub, m.SubmitNote(
                    sub.local_id, f"no answer from the backend ({error_text(exc)}); asking again"))
                self._lost(exc)
                return
            hint = size_hint(getattr(exc, "fields", ()), panel=sub.panel_hints)
            self._tell_row(sub, m.JobRejected(sub.local_id, f"refused by the backend: {error_text(exc)}{hint}"))
            if code in CONNECTION_CODES:
                self._lost(exc)
            return
        except Exception as exc:  # noqa: BLE001
            self._tell_row(sub, m.JobRejected(sub.local_id, f"submit failed: {error_text(exc)}"))
            self._lost(exc)
            return
        job_id = str(_get(accepted, "job_id"))
        if sub.cancelled:  # its row has ended: only the backend is still owed the cancel
            self._guard(lambda: self.client.cancel(job_id))
            if self.client is None:
                self.waiting_cancels.add(job_id)
            return
        request = _to_builtins(req)
        frames = _get(req, "frames", 0)
        self.jobs[job_id] = Track(sub.out_root, expected=frames if isinstance(frames, int) else 0,
                                  request=request if isinstance(request, dict) else {})
        self.last_heard = time.monotonic()
        self.outbox.put(m.JobAccepted(sub.local_id, job_id, int(_get(accepted, "queue_position", 0))))

    def _tell_row(self, sub: m.SubmitJob, msg: Any) -> None:
        """A message about a submit for its job row; none once the artist cancelled it (the
        row has ended: only the backend is still owed something)."""
        if not sub.cancelled:
            self.outbox.put(msg)

    def _watch(self, job_ids: list[str]) -> None:
        statuses = self._guard(lambda: self.client.watch(job_ids), job_ids)
        if statuses is None:
            return
        self.last_heard = time.monotonic()
        for st in statuses:
            self._status(st)

    def _status(self, st: Any) -> None:
        job_id = str(_get(st, "job_id"))
        if job_id not in self.jobs:
            return
        state = str(_get(st, "state", ""))
        if state == "finished":
            self._collect(job_id, None)
        elif state in ("failed", "interrupted"):
            msg = _get(st, "error", "") or state
            code = _get(st, "error_code", "")
            if code == "not_found":
                self._gone(job_id, f"{code}: {msg}")
            else:
                self._end(job_id, m.JobFailed(job_id, f"{code}: {msg}" if code else msg, state))
        elif state == "cancelled":
            why = str(_get(st, "error", "") or "")
            self._end(job_id, m.JobFailed(job_id, why if "(admin)" in why else "cancelled", "cancelled"))
        else:
            self.outbox.put(m.JobProgress(job_id, state, int(_get(st, "step", 0)), int(_get(st, "total_steps", 0)),
                                          queue_position=int(_get(st, "queue_position", -1))))

    def _gone(self, job_id: str, why: str) -> None:
        """The backend no longer knows the job: it pruned it (its retention, 72 h by default),
        or it runs with another data folder now.  Its take may be on disk all the same: written
        by this add-on while another .blend was open, it waits in the job's folder for the
        file to be reopened.  A whole take there ends the job as done, from disk, with the
        seed and settings the row asked for; frames missing from it fail the job with the
        folder named, so that what is there can still be used."""
        track = self.jobs.get(job_id)
        if track is None:
            return
        folder, names, complete = take_on_disk(track.out_root, job_id, track.expected)
        if complete:
            # The backend's own settings, written with the frames, name the camera MotionLoRAs
            # it used by id; the row's request (a take written before they were) by name only.
            stored = files.take_settings(folder) or {"seed": track.request.get("seed", 0),
                                                     "settings": track.request}
            seed = stored.get("seed", 0)
            seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
            self._end(job_id, m.JobDone(job_id, str(folder), names, seed, dict(stored["settings"])))
            return
        if names:
            of = f" of {track.expected}" if track.expected else ""
            missing = next(name for name in files.frame_names(len(names) + 1) if name not in names)
            why += f"; the take on disk is incomplete: {len(names)}{of} frames in {folder} ({missing} is missing)"
        self._end(job_id, m.JobFailed(job_id, why))

    def _end(self, job_id: str, msg: Any) -> None:
        track = self.jobs.pop(job_id, None)
        if track and track.preview_path:
            _remove(track.preview_path)
        self.outbox.put(msg)

    def _collect(self, job_id: str, finished: Any) -> None:
        track = self.jobs.get(job_id)
        if track is None:
            return
        total = int(_get(finished, "frames", 0)) if finished is not None else 0
        frames: list[bytes] | None = None
        if finished is not None and total and all(i in track.frames for i in range(total)):
            frames = [track.frames[i] for i in range(total)]
        if frames is None:
            result = self._guard(lambda: self.client.fetch(job_id), [job_id])
            if result is None:
                return  # connection lost; collected after the reconnect
            frames = list(_get(result, "frames", []) or [])
            if finished is None:
                finished = _get(result, "finished", None)
        settings = _to_builtins(_get(finished, "settings", {})) if finished is not None else {}
        settings = settings if isinstance(settings, dict) else {}
        seed = int(_get(finished, "seed", 0) or 0)
        try:
            # With the settings beside the frames: a take found there once the backend has
            # forgotten the job is placed with them (`_gone`).
            directory, names = files.write_frames(track.out_root, job_id, frames,
                                                  {"seed": seed, "settings": settings} if settings else None)
        except (OSError, ValueError) as exc:
            self._end(job_id, m.JobFailed(job_id, f"could not store the frames: {error_text(exc)}"))
            return
        self._end(job_id, m.JobDone(job_id, str(directory), names, seed, settings))

    def _move(self, cmd: m.MoveTake) -> None:
        done = cmd.done
        try:
            directory, note = str(files.move_frames(done.directory, done.files, cmd.out_root, done.job_id)), ""
        except (OSError, ValueError) as exc:  # it lands where it is, and the job says why
            directory, note = done.directory, f"could not move it to {cmd.out_root}: {error_text(exc)}"
        self.outbox.put(dataclasses.replace(done, directory=directory, settled=True, note=note))

    def _queue_view(self) -> None:
        """The backend's queue for the panel, every QUEUE_VIEW_S while this add-on has jobs on
        it, and once empty when it has none left (a backend older than protocol 1.2 cannot
        list it: nothing is shown)."""
        if not self.jobs:
            if self.queue_view_shown:
                self.queue_view_shown = False
                self.outbox.put(m.QueueView("", []))
            return
        now = time.monotonic()
        if now < self.next_queue_view or self.client is None:
            return
        self.next_queue_view = now + QUEUE_VIEW_S
        listing = self._guard(lambda: self.client.list_jobs())
        if listing is not None:
            self.outbox.put(m.QueueView(*queue_lines(listing)))
            self.queue_view_shown = True

    def _pump(self) -> None:
        from .protocol.client import ClientError

        try:
            event = self.client.poll(POLL_S)
        except ClientError as exc:
            self._lost(exc)
            return
        except Exception as exc:  # noqa: BLE001 - garbage from the peer must not kill the thread
            self._lost(exc)
            return
        now = time.monotonic()
        if event is None:
            if self.jobs and now - self.last_heard > SILENCE_CHECK_S:
                self.last_heard = now
                self._watch(list(self.jobs))
            return
        self.last_heard = now
        try:
            self._event(event)
        except Exception as exc:  # noqa: BLE001
            job_id = str(_get(_get(event, "content"), "job_id", ""))
            if job_id in self.jobs:
                self._end(job_id, m.JobFailed(job_id, f"bad reply from the backend: {error_text(exc)}"))

    def _event(self, event: Any) -> None:
        kind = _get(event, "msg_type", "")
        content = _get(event, "content")
        buffers = list(_get(event, "buffers", []) or [])
        job_id = str(_get(content, "job_id", ""))
        track = self.jobs.get(job_id)
        if track is None:
            return
        if kind == "progress":
            preview = ""
            if _get(content, "has_preview", False) and buffers:
                preview = self._write_preview(job_id, track, int(_get(content, "step", 0)), buffers[0])
            self.outbox.put(m.JobProgress(job_id, "running", int(_get(content, "step", 0)),
                                          int(_get(content, "total_steps", 0)),
                                          float(_get(content, "remaining_s", -1.0)), str(_get(content, "phase", "")),
                                          preview))
        elif kind == "frames":
            start = int(_get(content, "start", 0))
            for i, data in enumerate(buffers):
                track.frames[start + i] = bytes(data)
        elif kind == "finished":
            self._collect(job_id, content)
        elif kind == "failed":
            self._end(job_id, m.JobFailed(job_id, f"{_get(content, 'code', 'failed')}: {_get(content, 'message', '')}"))
        elif kind == "cancelled":
            by = str(_get(content, "by", "") or "")  # (an admin's cancel, protocol 1.3)
            self._end(job_id, m.JobFailed(job_id, f"cancelled by {by} (admin)" if by else "cancelled", "cancelled"))

    def _write_preview(self, job_id: str, track: Track, step: int, data: bytes) -> str:
        if not bytes(data[:8]) == files.PNG_MAGIC:
            return ""
        try:
            os.makedirs(self.preview_dir, exist_ok=True)
            path = os.path.join(self.preview_dir, f"{files.short_id(job_id)}_{step:04d}.png")
            with open(path, "wb") as fh:
                fh.write(bytes(data))
        except OSError:
            return ""
        if track.preview_path and track.preview_path != path:
            _remove(track.preview_path)
        track.preview_path = path
        return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
