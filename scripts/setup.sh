#!/usr/bin/env bash
# Idempotent developer set-up: the backend virtual environment (CPU torch pinned)
# and Blender-as-a-module environments for the add-on tests: each LTS line and the
# first and newest 5.x (4.2, 4.5, 5.0 on Python 3.11; 5.3 on Python 3.13).
# Re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

BPY_OLD_VERSION="${BPY_OLD_VERSION:-4.2.23}"
BPY_NEW_VERSION="${BPY_NEW_VERSION:-5.3.0}"
# Between them: the other API steps of the Sequencer (sequencer_compat.py): `strips` beside
# `sequences` (4.4 / 4.5 LTS), `sequences` gone and a Sequencer scene of its own (5.0).
BPY_MIDDLE_VERSIONS="${BPY_MIDDLE_VERSIONS-45=4.5.15 50=5.0.1}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

find_python() {  # find_python 3.11 -> path of a working interpreter
    local want="$1" cand
    for cand in "python$want" "$HOME/.pyenv/versions/$want"*/bin/"python$want" /usr/bin/"python$want" /usr/local/bin/"python$want"; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys' >/dev/null 2>&1; then
            command -v "$cand"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local v; v=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.|$)" | tail -n 1 || true)
        if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python$want"; return 0; fi
    fi
    return 1
}

py311=$(find_python 3.11) || { echo "setup: Python 3.11 is required (backend and Blender 4.2-5.0 tests)" >&2; exit 1; }

stamp_ok() { [ -f "$1/.setup-stamp" ] && [ "$(cat "$1/.setup-stamp")" = "$2" ]; }

# A fresh set-up takes ~6.5 GB (torch ~2.5, each Blender ~1).  pip's own "No space left on
# device" comes half-way through and names no number; say it first, in one line.
NEED_FREE_MB="${NEED_FREE_MB:-7000}"
if ! stamp_ok .venv-bpy42 "$BPY_OLD_VERSION"; then
    free_mb=$(df -Pm . | awk 'NR == 2 { print $4 }')
    if [ -n "$free_mb" ] && [ "$free_mb" -lt "$NEED_FREE_MB" ]; then
        echo "setup: only ${free_mb} MB free on $(df -P . | awk 'NR == 2 { print $6 }'); a fresh set-up needs about ${NEED_FREE_MB} MB (NEED_FREE_MB=0 skips this check)" >&2
        exit 1
    fi
fi

# 1. backend + dev tools
want="torch==$TORCH_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if ! stamp_ok .venv "$want"; then
    echo "setup: backend environment (.venv)"
    [ -x .venv/bin/python ] || "$py311" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The CPU build of torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
    .venv/bin/python -m pip install -q -e ".[backend,dev]"
    echo "$want" > .venv/.setup-stamp
fi

install_bpy() {  # install_bpy VENV VERSION PYTHON
    if ! stamp_ok "$1" "$2"; then
        echo "setup: Blender $2 module ($1)"
        [ -x "$1/bin/python" ] || "$3" -m venv "$1"
        "$1/bin/python" -m pip install -q "bpy==$2"
        echo "$2" > "$1/.setup-stamp"
    fi
}

# 2. Blender 4.2 LTS, then the middle versions, as Python modules (Python 3.11)
install_bpy .venv-bpy42 "$BPY_OLD_VERSION" "$py311"
for pair in $BPY_MIDDLE_VERSIONS; do
    install_bpy ".venv-bpy${pair%%=*}" "${pair#*=}" "$py311"
done

# 3. newest Blender 5.x as a Python module (Python 3.13)
if py313=$(find_python 3.13); then
    install_bpy .venv-bpy5 "$BPY_NEW_VERSION" "$py313"
else
    echo "setup: no Python 3.13 found; the Blender 5.x add-on tests will fail (CI) or skip (locally)" >&2
fi
echo "setup: done"
