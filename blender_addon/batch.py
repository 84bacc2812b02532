"""Render a shot list through the AnimateDiff add-on, headless.

    blender -b film.blend --python-exit-code 1 -P batch.py -- shots.toml [options]
    python batch.py shots.toml --blend film.blend [options]      # a Python with the `bpy` wheel

Options:
    --out-blend PATH     save the result here (default: the opened .blend, else <shots>.blend)
    --overwrite          replace PATH if it exists and is not the opened .blend (else an error)
    --address ADDR       backend address (default: the add-on preferences, tcp://127.0.0.1:5557)
    --key-file PATH      shared HMAC key file (default: the preferences, else the user's default key)
    --server-public-key PATH / --client-secret-key PATH   CurveZMQ certificates (both or neither)
    --timeout SECONDS    per shot, above 0 (default 3600); a shot running longer is cancelled
    --addon-zip ZIP      install this extension zip into a throw-away Blender profile first
                         (only when run as `python batch.py`: Blender picks its profile at start)
    --repo NAME          extension repository the add-on is installed in (default user_default)

The shot list is TOML (`[[shot]]` tables, optional `[defaults]`) or JSON (a list, or
{"shots": [...], "defaults": {...}}); any other top-level key is an error.  Keys per shot:
name, prompt, negative_prompt, prompt_travel, base_model, motion_module, motion_loras
({"ZoomIn": 0.8, "lora:x.safetensors": 0.5}), frames, width, height, steps, guidance, seed,
preset (quality | fast | lightning | lcm), context_length, context_stride, channel,
start_frame, and the API's connection keys.  Keys left out come from the AnimateDiff
settings of the scene the Sequencer edits (Blender 5's sequencer scene, else the window's;
frames: its Frames or length; size: its render aspect).  The strips land in that scene too.

Every shot is rendered even if one fails (one whose backend stopped answering, its job
maybe still running there, is asked for again after the others); the .blend is saved with the strips that
succeeded (a save that fails after a shot is reported and tried again after the next); the
exit code is 0 only when every shot succeeded and the .blend was saved (1: a shot failed or
the last save did, 2: bad arguments, shot list or installation -- a --timeout not above 0,
a --blend, --addon-zip or key file that is missing, a --blend or --addon-zip that cannot be
opened or installed, one CurveZMQ certificate without the other, a shot value out of range --
found before anything is saved).
"""

import argparse
import atexit
import contextlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

ADDON_ID = "animatediff_blender"
TOP_LEVEL_KEYS = ("shot", "shots", "defaults")
# Options naming a file the connection reads (the keyword a shot uses for each).
KEY_FILE_OPTIONS = (("--key-file", "key_file"), ("--server-public-key", "server_public_key_file"),
                    ("--client-secret-key", "client_secret_key_file"))
CURVE_KEYS = ("server_public_key_file", "client_secret_key_file")


class BatchError(Exception):
    pass


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="batch.py", description="Render an AnimateDiff shot list into a .blend")
    ap.add_argument("shots")
    ap.add_argument("--blend", help="open this .blend first (python batch.py only)")
    ap.add_argument("--out-blend")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out-blend")
    ap.add_argument("--address")
    ap.add_argument("--key-file")
    ap.add_argument("--server-public-key")
    ap.add_argument("--client-secret-key")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--addon-zip")
    ap.add_argument("--repo", default=None,
                    help="the extension repository it is installed in (default: the one that has it; "
                         "user_default for --addon-zip)")  # fmt: skip
    return ap.parse_args(argv)


def load_shots(path):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise BatchError(f"cannot read the shot list: {exc}") from exc
    is_json = path.lower().endswith(".json")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors) is no part of it
        if is_json:
            doc = json.loads(text)
        else:
            import tomllib

            doc = tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchError(f"{path}: not valid {'JSON' if is_json else 'TOML'}: {exc}") from exc
    defaults = {}
    if isinstance(doc, list):
        shots = doc
    elif isinstance(doc, dict):
        # A misspelt [default] table or a bare `steps = 2` meant for every shot used to be
        # ignored without a word, and a list with both `shot` and `shots` lost one of them.
        unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
        if unknown:
            want = ('"shots" (or "shot") and an optional "defaults"' if is_json else
                    "[[shot]] tables and an optional [defaults] table (a setting for every shot goes there)")
            raise BatchError(f"{path}: unknown top-level key(s) {', '.join(_short(k) for k in unknown)}: "
                             f"a shot list holds {want}")
        if "shot" in doc and "shots" in doc:
            raise BatchError(f"{path}: both `shot` and `shots` are given: put every shot in one of them")
        shots = doc.get("shot", doc.get("shots"))
        defaults = doc.get("defaults", {}) or {}
    else:
        shots = None
    if not isinstance(shots, list) or not shots or not all(isinstance(s, dict) for s in shots):
        raise BatchError(f"{path}: expected a non-empty list of shots ([[shot]] tables in TOML)")
    if not isinstance(defaults, dict):
        raise BatchError(f"{path}: [defaults] must be a table")
    return [{**defaults, **s} for s in shots]


def find_addon(repo, zip_path, inside_blender):
    import addon_utils
    import bpy

    names = [m.__name__ for m in addon_utils.modules(refresh=True)]
    if repo is None:
        # Whichever repository holds it (a TD may deploy it to the shared `system` one):
        # an enabled copy first, then user_default's, then any.
        found = sorted(n for n in names if n.startswith("bl_ext.") and n.endswith(f".{ADDON_ID}")
                       and n.count(".") == 2)  # fmt: skip
        enabled = [n for n in found if n in bpy.context.preferences.addons]
        default = f"bl_ext.user_default.{ADDON_ID}"
        pick = enabled or ([default] if default in found else found) or [default]
        repo = pick[0].split(".")[1]
    module = f"bl_ext.{repo}.{ADDON_ID}"
    installed = module in names
    if module not in bpy.context.preferences.addons and installed:
        try:
            bpy.ops.preferences.addon_enable(module=module)
        except Exception:  # noqa: BLE001 - not installed: handled below
            pass
    if module not in bpy.context.preferences.addons and zip_path:
        if inside_blender:
            raise BatchError("--addon-zip works with `python batch.py` only; in Blender, install the zip "
                             "(Preferences > Get Extensions > Install from Disk) or run blender with "
                             "BLENDER_USER_RESOURCES pointing at a profile that has it")
        # Blender reports why a zip is not installed (not a zip, made for another Blender or
        # Python) by printing it and still returns FINISHED: keep what it prints to say why.
        printed = _Tee(sys.stdout)
        try:
            with contextlib.redirect_stdout(printed):
                result = bpy.ops.extensions.package_install_files(filepath=os.path.abspath(zip_path), repo=repo,
                                                                  enable_on_install=True)
        except RuntimeError as exc:  # not a zip, not this platform's, unreadable...
            raise BatchError(f"installing {zip_path} failed: {_blender_error(exc)}") from exc
        if result != {"FINISHED"}:
            raise BatchError(f"installing {zip_path} failed: {_reported(printed.text) or result}")
        reason = _reported(printed.text)
        if module not in bpy.context.preferences.addons and not reason:
            if any(m.__name__ == module for m in addon_utils.modules(refresh=True)):  # installed, not enabled
                try:
                    bpy.ops.preferences.addon_enable(module=module)
                except Exception as exc:  # noqa: BLE001 - its register() failed, say, in words below
                    reason = f"it was installed but could not be enabled: {_blender_error(exc)}"
        if module not in bpy.context.preferences.addons:
            raise BatchError(f"installing {zip_path} failed: "
                             f"{reason or f'Blender did not install {module} from it (see its messages above)'}")
    if module not in bpy.context.preferences.addons:
        raise BatchError(f"the AnimateDiff extension is not installed in this Blender profile (looked for "
                         f"{module}); install it, or pass --addon-zip with `python batch.py` (or --repo "
                         f"NAME for the extension repository that has it)")
    return importlib.import_module(module)


def check_args(args, inside_blender):
    """What can be told wrong from the arguments alone, before anything is opened or saved
    (a bad --timeout used to fail every shot, after a .blend was saved that then blocked
    the corrected run)."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise BatchError(f"--timeout must be a number of seconds above 0, not {args.timeout:g}")
    if args.blend and inside_blender:
        raise BatchError("--blend is for `python batch.py`; with blender, pass the .blend before -P")
    if args.address is not None:
        args.address = args.address.strip()  # " tcp://gpu:5557" pasted with a space
        if not args.address:
            raise BatchError("--address is empty: give a ZeroMQ address such as tcp://gpu-box:5557")
    # (--addon-zip with an installed add-on is ignored inside Blender; find_addon refuses it otherwise.)
    # A key file that is not there used to fail every shot, after a .blend was saved.
    files = [("--blend", args.blend), ("--addon-zip", None if inside_blender else args.addon_zip)]
    files += [(option, getattr(args, option[2:].replace("-", "_"))) for option, _key in KEY_FILE_OPTIONS]
    for option, path in files:
        if path and not os.path.isfile(path):
            raise BatchError(f"{option} {path}: {_no_file(path)}")
    if bool(args.server_public_key) != bool(args.client_secret_key):
        raise BatchError("CurveZMQ needs both --server-public-key (the backend's .key) and --client-secret-key "
                         "(this client's .key_secret), or neither")


def check_shot_files(name, shot, connection):
    """A shot's own key files exist, and its CurveZMQ certificates (its own, else the command
    line's) come as a pair: else every connection of the shot fails, after the shots before it."""
    for _option, key in KEY_FILE_OPTIONS:
        path = shot.get(key)
        if path and not os.path.isfile(os.path.expandvars(os.path.expanduser(path))):  # (as the worker reads it)
            raise BatchError(f"{name}: {key} {path}: {_no_file(path)}")
    given = {key: shot[key] if shot.get(key) is not None else connection.get(key) for key in CURVE_KEYS}
    if bool(given["server_public_key_file"]) != bool(given["client_secret_key_file"]):
        raise BatchError(f"{name}: CurveZMQ needs both server_public_key_file and client_secret_key_file "
                         "(a shot's own, or --server-public-key and --client-secret-key), or neither")


def _no_file(path):
    return "not a file" if os.path.exists(path) else "no such file"


def main(argv, inside_blender):
    args = parse_args(argv)
    check_args(args, inside_blender)
    shots = load_shots(args.shots)
    if args.addon_zip and not inside_blender and "BLENDER_USER_RESOURCES" not in os.environ:
        # A throw-away profile: the user's own Blender setup stays untouched, and nothing is
        # left behind (a farm runs this thousands of times; each profile is ~5 MB).
        profile = tempfile.mkdtemp(prefix="animatediff-batch-profile-")
        atexit.register(shutil.rmtree, profile, ignore_errors=True)
        os.environ["BLENDER_USER_RESOURCES"] = profile
    import bpy

    if args.blend:
        try:
            bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.blend))
        except RuntimeError as exc:  # unreadable, not a .blend, from a newer Blender...
            raise BatchError(f"cannot open {args.blend}: {_blender_error(exc)}") from exc
    addon = find_addon(args.repo, args.addon_zip, inside_blender)
    api = importlib.import_module(addon.__name__ + ".api")
    sc = importlib.import_module(addon.__name__ + ".sequencer_compat")
    st = importlib.import_module(addon.__name__ + ".settings")
    # The scene the Sequencer edits, as the panel and its operators use (Blender 5: the
    # workspace's sequencer scene, often not the window's): its settings, length, render size
    # and current frame are the defaults, and the strips land there.
    scene = sc.edit_scene(bpy.context)
    connection = {"address": args.address, "key_file": args.key_file,
                  "server_public_key_file": args.server_public_key,
                  "client_secret_key_file": args.client_secret_key}
    connection = {k: v for k, v in connection.items() if v}

    # Validate every shot before rendering any: the keys, the values as the protocol checks
    # them, camera-motion weights and a shot's own connection keys included (a typo in the
    # last shot must not surface after hours of rendering).
    known = {*st.REQUEST_KEYS, *st.PLACEMENT_KEYS, "motion_loras", *api.CONNECTION_KEYS}
    names = []
    for i, shot in enumerate(shots):
        shot = dict(shot)
        names.append(_short(shot.pop("name", f"shot {i + 1}"), 80))
        # `scene`, `timeout`, `on_event` are arguments of the API's calls, not settings: in a
        # shot they ended in a TypeError traceback.
        unknown = sorted((k for k in shot if k not in known), key=str)
        if unknown:
            hint = " (the time limit of a shot is --timeout)" if "timeout" in unknown else ""
            raise BatchError(f"{names[-1]}: unknown setting(s): {', '.join(_short(k) for k in unknown)}{hint}")
        if isinstance(shot.get("address"), str):
            shots[i]["address"] = shot["address"] = shot["address"].strip()
        try:
            api.check(scene, **shot)
        except api.AnimateDiffError as exc:
            raise BatchError(f"{names[-1]}: {exc}") from exc
        check_shot_files(names[-1], shot, connection)

    out_blend = args.out_blend or bpy.data.filepath or os.path.splitext(os.path.abspath(args.shots))[0] + ".blend"
    out_blend = os.path.abspath(out_blend)
    opened = os.path.abspath(bpy.data.filepath) if bpy.data.filepath else ""
    if os.path.exists(out_blend) and out_blend != opened and not args.overwrite:
        # e.g. a second `python batch.py shots.toml`: a fresh scene saved over the first
        # run's shots.blend would drop every strip in it.
        raise BatchError(f"{out_blend} exists and is not the .blend being worked on; pass --blend {out_blend} "
                         "to add these shots to it, another --out-blend, or --overwrite to replace it")
    # Save first: frames go to //animatediff/ next to the .blend, with relative paths.
    try:
        bpy.ops.wm.save_as_mainfile(filepath=out_blend)
    except RuntimeError as exc:  # e.g. its folder does not exist
        raise BatchError(f"cannot save {out_blend}: {_blender_error(exc)}") from exc

    def interrupted(where):
        """Ctrl+C (api.wait has cancelled the job on the backend): keep what is done, and stop."""
        problem = save(bpy)
        print(f"batch: interrupted {where}; {f'NOT saved: {problem}' if problem else f'saved {out_blend}'}",
              flush=True)
        return 130

    def placed(i, name, strip, t0):
        print(f"[{i + 1}/{len(shots)}] {name}: strip {strip.name!r} on channel {strip.channel} at frame "
              f"{sc.strip_start(strip)}, {len(strip.elements)} frames ({time.monotonic() - t0:.1f} s)", flush=True)
        problem = save(bpy)  # keep what is done even if a later shot hangs
        if problem:  # the shots still to render are not lost for it: tried again after each
            print(f"[{i + 1}/{len(shots)}] {name}: could not save {out_blend} ({problem}); going on", flush=True)

    failures = 0
    left_running = []  # (index, name, job): jobs a lost backend may still be rendering
    for i, (name, shot) in enumerate(zip(names, shots, strict=True)):
        shot = {k: v for k, v in shot.items() if k != "name"}
        print(f"[{i + 1}/{len(shots)}] {name}: {str(shot.get('prompt', ''))[:60]!r}", flush=True)
        t0 = time.monotonic()
        try:
            strip = api.generate(scene, timeout=args.timeout, **{**connection, **shot})  # the shot's own win
        except KeyboardInterrupt:
            return interrupted(f"at shot {i + 1} of {len(shots)} ({name}); {i - failures} ok before it")
        except api.AnimateDiffError as exc:
            failures += 1
            if exc.job is not None:  # its frames are not lost yet: asked for again at the end
                left_running.append((i, name, exc.job))
                print(f"[{i + 1}/{len(shots)}] {name}: FAILED for now: {exc.reason}; asked for again after the "
                      "other shots", flush=True)
            else:
                print(f"[{i + 1}/{len(shots)}] {name}: FAILED: {exc}", flush=True)
            continue
        placed(i, name, strip, t0)
    for i, name, job in left_running:
        print(f"[{i + 1}/{len(shots)}] {name}: asking the backend again for job {job.job_id}", flush=True)
        t0 = time.monotonic()
        try:
            strip = api.insert(scene, api.wait(job, timeout=args.timeout))
        except KeyboardInterrupt:
            return interrupted(f"collecting shot {i + 1} ({name})")
        except api.AnimateDiffError as exc:
            later = (f" (once it is back, `animatediff-blender generate --resume {job.job_id} --out DIR` "
                     "fetches the frames)") if exc.job is not None else ""
            print(f"[{i + 1}/{len(shots)}] {name}: FAILED: {exc.reason}{later}", flush=True)
            continue
        failures -= 1
        placed(i, name, strip, t0)
    problem = save(bpy)
    if problem:
        saved = (f"NOT saved: could not save {out_blend} ({problem}); the frames of the shots are in "
                 f"{bpy.path.abspath('//animatediff')}")
    else:
        saved = f"saved {out_blend}"
    print(f"batch: {len(shots)} shots, {len(shots) - failures} ok, {failures} failed; {saved}", flush=True)
    return 1 if failures or problem else 0


def save(bpy):
    """Save the opened .blend; None, or why it could not be saved (a full disk, a quota)."""
    try:
        bpy.ops.wm.save_mainfile()
    except RuntimeError as exc:
        return _blender_error(exc)
    return None


def _blender_error(exc):
    """A bpy.ops RuntimeError in words ("Error: Cannot read file ..." -> "Cannot read file ...")."""
    return str(exc).strip().removeprefix("Error: ").strip()


class _Tee:
    """Writes through to `stream` and keeps a copy (what a Blender operator printed)."""

    def __init__(self, stream):
        self.stream = stream
        self.parts = []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # encoding, isatty...: the stream's
        return getattr(self.stream, name)

    @property
    def text(self):
        return "".join(self.parts)


def _reported(printed):
    """The errors an extensions operator printed in the background ("ERROR <message>" lines)."""
    errors = [line.split(" ", 1)[1].strip() for line in printed.splitlines()
              if line.startswith(("ERROR ", "FATAL_ERROR "))]
    return "; ".join(e for e in errors if e)


def _short(value, limit=40):
    """A name or key for a message, cut short (`name = 1e400` written as an int included)."""
    text = str(value)
    if len(text) <= limit:
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{text[:12]}...({len(text.lstrip('-'))} digits)"
    return text[: limit - 3] + "..."


def _clip_numbers(message):
    """A 400-digit number in a message, shortened to its first digits and its length."""
    return re.sub(r"\d{41,}", lambda m: f"{m[0][:12]}...({len(m[0])} digits)", message)


def run():
    inside_blender = "bpy" in sys.modules  # blender -P pre-imports bpy; `python batch.py` does not
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    try:
        code = main(argv, inside_blender)
    except BatchError as exc:
        print(f"batch: error: {_clip_numbers(str(exc))}", file=sys.stderr, flush=True)
        code = 2
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    run()
