"""Render a shot list through the AnimateDiff add-on, headless.

    blender -b film.blend --python-exit-code 1 -P batch.py -- shots.toml [options]
    python batch.py shots.toml --blend film.blend [options]      # a Python with the `bpy` wheel

Options:
    --out-blend PATH     save the result here (default: the opened .blend, else <shots>.blend)
    --overwrite          replace PATH if it exists and is not the opened .blend (else an error)
    --address ADDR       backend address (default: the add-on preferences, tcp://127.0.0.1:5557)
    --key-file PATH      shared HMAC key file (default: the preferences, else the user's default key)
    --server-public-key PATH / --client-secret-key PATH   CurveZMQ certificates
    --timeout SECONDS    per shot, above 0 (default 3600); a shot running longer is cancelled
    --addon-zip ZIP      install this extension zip into a throw-away Blender profile first
                         (only when run as `python batch.py`: Blender picks its profile at start)
    --repo NAME          extension repository the add-on is installed in (default user_default)

The shot list is TOML (`[[shot]]` tables, optional `[defaults]`) or JSON (a list, or
{"shots": [...], "defaults": {...}}).  Keys per shot: name, prompt, negative_prompt,
prompt_travel, base_model, motion_module, motion_loras ({"ZoomIn": 0.8, "lora:x.safetensors": 0.5}),
frames, width, height, steps, guidance, seed, preset (quality | fast | lightning | lcm),
context_length, context_stride, channel, start_frame.  Keys left out come from the scene's
AnimateDiff settings (frames: the scene length; size: the render size).

Every shot is rendered even if one fails; the .blend is saved with the strips that
succeeded (a save that fails after a shot is reported and tried again after the next); the
exit code is 0 only when every shot succeeded and the .blend was saved (1: a shot failed or
the last save did, 2: bad arguments, shot list or installation -- a --timeout not above 0,
a --blend or --addon-zip that is missing or cannot be opened -- found before anything is saved).
"""

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time

ADDON_ID = "animatediff_blender"


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
    ap.add_argument("--repo", default="user_default")
    return ap.parse_args(argv)


def load_shots(path):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise BatchError(f"cannot read the shot list: {exc}") from exc
    try:
        if path.lower().endswith(".json"):
            doc = json.loads(raw.decode("utf-8"))
        else:
            import tomllib

            doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchError(f"{path}: not valid {'JSON' if path.lower().endswith('.json') else 'TOML'}: {exc}") from exc
    defaults = {}
    if isinstance(doc, list):
        shots = doc
    elif isinstance(doc, dict):
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

    module = f"bl_ext.{repo}.{ADDON_ID}"
    installed = any(m.__name__ == module for m in addon_utils.modules(refresh=True))
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
        try:
            result = bpy.ops.extensions.package_install_files(filepath=os.path.abspath(zip_path), repo=repo,
                                                              enable_on_install=True)
        except RuntimeError as exc:  # not a zip, not this platform's, unreadable...
            raise BatchError(f"installing {zip_path} failed: {_blender_error(exc)}") from exc
        if result != {"FINISHED"}:
            raise BatchError(f"installing {zip_path} failed: {result}")
    if module not in bpy.context.preferences.addons:
        raise BatchError(f"the AnimateDiff extension is not installed in this Blender profile (looked for "
                         f"{module}); install it, or pass --addon-zip with `python batch.py`")
    return importlib.import_module(module)


def check_args(args, inside_blender):
    """What can be told wrong from the arguments alone, before anything is opened or saved
    (a bad --timeout used to fail every shot, after a .blend was saved that then blocked
    the corrected run)."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise BatchError(f"--timeout must be a number of seconds above 0, not {args.timeout:g}")
    if args.blend and inside_blender:
        raise BatchError("--blend is for `python batch.py`; with blender, pass the .blend before -P")
    # (--addon-zip with an installed add-on is ignored inside Blender; find_addon refuses it otherwise.)
    for option, path in (("--blend", args.blend), ("--addon-zip", None if inside_blender else args.addon_zip)):
        if path and not os.path.isfile(path):
            raise BatchError(f"{option} {path}: {'not a file' if os.path.exists(path) else 'no such file'}")


def main(argv, inside_blender):
    args = parse_args(argv)
    check_args(args, inside_blender)
    shots = load_shots(args.shots)
    if args.addon_zip and not inside_blender and "BLENDER_USER_RESOURCES" not in os.environ:
        # A throw-away profile: the user's own Blender setup stays untouched.
        os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="animatediff-batch-profile-")
    import bpy

    if args.blend:
        try:
            bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.blend))
        except RuntimeError as exc:  # unreadable, not a .blend, from a newer Blender...
            raise BatchError(f"cannot open {args.blend}: {_blender_error(exc)}") from exc
    addon = find_addon(args.repo, args.addon_zip, inside_blender)
    api = importlib.import_module(addon.__name__ + ".api")
    sc = importlib.import_module(addon.__name__ + ".sequencer_compat")
    scene = bpy.context.scene

    # Validate every shot before rendering any: the keys, the values as the protocol checks
    # them, camera-motion weights and a shot's own connection keys included (a typo in the
    # last shot must not surface after hours of rendering).
    names = []
    for i, shot in enumerate(shots):
        shot = dict(shot)
        names.append(str(shot.pop("name", f"shot {i + 1}")))
        try:
            api.check(scene, **shot)
        except api.AnimateDiffError as exc:
            raise BatchError(f"{names[-1]}: {exc}") from exc

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

    connection = {"address": args.address, "key_file": args.key_file,
                  "server_public_key_file": args.server_public_key,
                  "client_secret_key_file": args.client_secret_key}
    connection = {k: v for k, v in connection.items() if v}
    failures = 0
    for i, (name, shot) in enumerate(zip(names, shots, strict=True)):
        shot = {k: v for k, v in shot.items() if k != "name"}
        print(f"[{i + 1}/{len(shots)}] {name}: {str(shot.get('prompt', ''))[:60]!r}", flush=True)
        t0 = time.monotonic()
        try:
            strip = api.generate(scene, timeout=args.timeout, **{**connection, **shot})  # the shot's own win
        except api.AnimateDiffError as exc:
            failures += 1
            print(f"[{i + 1}/{len(shots)}] {name}: FAILED: {exc}", flush=True)
            continue
        print(f"[{i + 1}/{len(shots)}] {name}: strip {strip.name!r} on channel {strip.channel} at frame "
              f"{sc.strip_start(strip)}, {len(strip.elements)} frames ({time.monotonic() - t0:.1f} s)", flush=True)
        problem = save(bpy)  # keep what is done even if a later shot hangs
        if problem:  # the shots still to render are not lost for it: tried again after each
            print(f"[{i + 1}/{len(shots)}] {name}: could not save {out_blend} ({problem}); going on", flush=True)
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


def run():
    inside_blender = "bpy" in sys.modules  # blender -P pre-imports bpy; `python batch.py` does not
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    try:
        code = main(argv, inside_blender)
    except BatchError as exc:
        print(f"batch: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    run()
