#!/usr/bin/env bash
# The one prepared GPU benchmark run (issue #6): stock diffusers vs our engine on real
# SD1.5 + AnimateDiff v2 sizes with random weights, every case, the levers one at a time.
# Writes JSON per phase plus one log into $OUT.  Fits ~8 minutes on an H100/H200: phases
# run in priority order and a phase that no longer fits the budget is skipped (and says so).
#
# The GPU machine has torch, transformers, safetensors, peft, huggingface-hub, pillow and
# numpy, but NOT diffusers, importlib_metadata, pyzmq or msgspec.  Bring them as wheels in
# .whl/ (git-ignored), made once on a machine with network, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata pyzmq==27.1.0 msgspec==0.22.0 isal==1.9.1
#
# Then, from the session's device tool (one call; carry the wheels):
#   run(command="BENCH_BUDGET_S=570 bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=600)
#
# CPU rehearsal (tiny sizes, proves the script; timings meaningless):
#   BENCH_ARGS="--device cpu --size tiny --compile-backend eager" BENCH_BUDGET_S=900 \
#     OUT=/tmp/gpu-bench-out bash scripts/gpu_bench.sh
#
# Environment: OUT (results folder), BENCH_BUDGET_S (seconds for all phases, default 480),
# BENCH_ARGS (extra arguments for every phase), BENCH_WORKDIR (models + compile cache),
# BENCH_PHASES (default "main long64 restart long128 levers modes"; also "next", "vae",
# "verify", "attention" (bench-attention) and "serverside" (bench-server on the GPU
# machine's CPUs); a later GPU session runs e.g. BENCH_PHASES="attention long64 restart
# serverside" for what is still unmeasured).
set -u -o pipefail

OUT=${OUT:-$PWD/gpu-bench-out}
BUDGET=${BENCH_BUDGET_S:-480}
WORKDIR=${BENCH_WORKDIR:-/tmp/adb-bench}
EXTRA=${BENCH_ARGS:-}
# The candidate default of the k* phases (the Triton kernel with the long clips' memory lever).
CANDIDATE=${BENCH_CANDIDATE:-default+temporal-sdpa:triton+split-batch}
START=$(date +%s)
mkdir -p "$OUT" "$WORKDIR"
LOG="$OUT/bench.log"
: >"$LOG"

say() { echo "[gpu_bench $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# --- dependencies: the carried wheels, only where a package is missing -----------------
# A warm machine keeps /tmp between calls: reuse the wheels unpacked by the last call.
if [ -d /tmp/site/diffusers ] && [ -d /tmp/site/zmq ] && [ -d /tmp/site/msgspec ] && [ -d /tmp/site/isal ]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import diffusers, zmq, msgspec, isal" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        say "diffusers/pyzmq/msgspec/isal missing and no .whl/ carried: see this script's header"
        exit 2
    fi
    # A wheel is a zip laid out for site-packages: unpacking takes seconds where pip takes
    # ~20 (device time is scarce); pip only if that does not import.
    for w in .whl/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ! python3 -c "import diffusers, zmq, msgspec, isal" >>"$LOG" 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheel install failed"; exit 2; }
    fi
fi

# --- the project, importable as animatediff_blender.* without installing it -------------
if ! python3 -c "import animatediff_blender.backend.bench.run" 2>/dev/null; then
    ROOT=$(mktemp -d)/pkgroot
    mkdir -p "$ROOT/animatediff_blender"
    cp pkg/*.py "$ROOT/animatediff_blender/"
    ln -s "$PWD/protocol" "$ROOT/animatediff_blender/protocol"
    ln -s "$PWD/backend" "$ROOT/animatediff_blender/backend"
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import sys, torch, diffusers, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$LOG"

# cli ARGS...: the project's command line (`animatediff-blender ARGS...`), uninstalled.
cli() {
    python3 -c "import sys; from animatediff_blender.backend.cli import main; sys.exit(main(sys.argv[1:]))" "$@"
}
export -f cli  # `timeout` runs it in a child bash

# phase NAME MIN_SECONDS ARGS...: one bench process, bounded by what is left of the budget.
PHASES=${BENCH_PHASES:-main long64 restart long128 vae levers modes}
phase() {
    local name=$1 need=$2
    shift 2
    case " $PHASES " in *" $name "*) ;; *) say "phase $name not selected (BENCH_PHASES)"; return 0 ;; esac
    local t
    t=$(left)
    if [ "$t" -lt "$need" ]; then
        say "SKIPPED phase $name: ${t}s left, it needs about ${need}s (run it in another session)"
        return 0
    fi
    # A phase that overruns its estimate by half again is cut (its partial JSON is kept),
    # so one slow compile cannot starve every phase after it.
    [ "$t" -gt $((need * 3 / 2)) ] && t=$((need * 3 / 2))
    say "phase $name (up to ${t}s): bench $* $EXTRA"
    # shellcheck disable=SC2086  # EXTRA is a list of arguments
    timeout --kill-after=10 "$t" bash -c 'cli "$@"' cli \
        bench --workdir "$WORKDIR" --json "$OUT/$name.json" "$@" $EXTRA 2>&1 |
        grep --line-buffered -v -e "Loading weights" -e "Loading pipeline components" -e "Writing model shards" |
        tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "phase $name ended with exit code $rc$([ "$rc" = 124 ] && echo ' (out of time: partial JSON kept)')"
}

# attention NEED: `bench-attention` (no model weights, no bench process): every attention
# call of one quality and one 64-frame UNet step, each shape timed alone with each SDPA
# backend and, for the temporal calls, the attention written out and compiled by inductor
# ("reduced").
# Where a step's ~31 ms of attention goes (spatial, cross, temporal) and which backend the
# engine's `temporal-sdpa` lever should pick.  A tiny CPU rehearsal runs it at tiny sizes.
attention_phase() {
    local name=attention need=$1
    case " $PHASES " in *" $name "*) ;; *) say "phase $name not selected (BENCH_PHASES)"; return 0 ;; esac
    local t args
    t=$(left)
    if [ "$t" -lt "$need" ]; then
        say "SKIPPED phase $name: ${t}s left, it needs about ${need}s (run it in another session)"
        return 0
    fi
    [ "$t" -gt $((need * 3 / 2)) ] && t=$((need * 3 / 2))
    args="--case quality --case long64 --iters 10 --compiled"
    case " $EXTRA " in *" tiny "*) args="$args --size tiny --device cpu --iters 1" ;; esac
    say "phase $name (up to ${t}s): bench-attention $args"
    # shellcheck disable=SC2086  # args is a list of arguments
    timeout --kill-after=10 "$t" bash -c 'cli "$@"' cli bench-attention $args --json "$OUT/$name.json" 2>&1 |
        tee -a "$LOG"
    say "phase $name ended with exit code ${PIPESTATUS[0]}"
    # A later call on the warm machine (the temporal phase) finds it here.
    [ -f "$OUT/$name.json" ] && cp "$OUT/$name.json" "$WORKDIR/attention.json"
}

# 1. The targets: quality (denoise), lightning, end to end through the server, against
#    stock and (quality) stock + torch.compile; the engine at its default (regional compile
#    on CUDA); one UNet step of stock and of the engine profiled (kernel time by category).
phase main 200 --case quality --case lightning --case server --compile-anchor --profile
# 0a. (Not in the default list.)  The attention calls of a step, shape by shape (~150 s?
#    never run on a GPU yet: most of it is inductor compiling the 12 temporal shapes).
attention_phase 150
# 0. (Not in the default list: BENCH_PHASES="next vae restart long128".)  What the third
#    GPU session still had to measure, in one process: the default fast path (regional
#    compile + batched FreeNoise windows) against stock on quality (+ profile) and long64,
#    with the PSNR of its frames, and the server's end to end with streamed frames.
phase next 240 --case quality --case long64 --case server --repeats 1 --profile
# 1b. The VAE decode (0.21-0.26 s of lightning's 0.55-0.63 s end to end on an H200) and the
#    convolutions: the default against the default plus cuDNN's algorithms timed per shape
#    and the VAE decoder compiled and channels-last (one lever: device time is short; split
#    it in a later session if it pays), on lightning (stock anchor) and end to end through
#    the server (PNG writer; targets 0.35 s and 5 %).  The default's whole lightning job is
#    profiled: how long the GPU waits for the host, and its timeline (what the host was
#    doing in each idle gap; the trace is kept, gzipped, as
#    $OUT/vae.engine-default-lightning-trace.json.gz for reading again without a GPU).
phase vae 230 --case lightning --case server --repeats 2 --profile --lever default \
    --lever default+cudnn-benchmark+vae-compile+vae-channels-last
# 2. Long clip, 64 frames, windows of 16, stride 4 (one timed run each: ~26 s stock); the
#    default (batched windows) against batched windows that share their per-frame
#    projections (-9.1 % FLOPs), both compiled (~80 s warm-up each, then ~17 s); one
#    64-frame UNet step of stock and of the default profiled in place (why 259 TFLOP/s
#    where 16 frames reach 303).
phase long64 250 --case long64 --repeats 0 --profile --profile-case long64 --lever default --lever default+share-projections
# 3. A server restart: a second process with phase 1's compile cache on disk; its warm-up
#    (load + compile from the cache) is what the first job after a restart would pay.
#    On a fresh machine (no cache yet) it is a cold start instead (~110 s on an H200); its
#    first job after start (load + an eager job) is measured either way.
phase restart 110 --case server --engine-only --repeats 1
# 4. 128 frames (target: at most 2.1x the engine's 64-frame time; no stock run needed).
#    Needs ~270 s on an H200: load, compiling the 128-frame shape (the third session's
#    212 s were not enough for load + compile), one ~35 s run.
phase long128 270 --case long128 --engine-only --repeats 0
# 5. Levers one at a time on the quality case.
phase levers 150 --case quality --repeats 1 --lever eager --lever compile+channels-last+fuse-qkv \
    --lever sdpa:flash --lever sdpa:efficient --lever compile-dynamic --lever bf16 --lever channels-last \
    --lever default+cudnn-benchmark
# 5b. (Not in the default list.)  The temporal-sdpa lever on whole quality jobs, against the
#    default and stock, when the attention phase (this call's, or an earlier call's on the
#    same warm machine) found a backend that beats torch's choice at the temporal shapes by
#    more than 5 % of the step's attention time; otherwise it says so and costs nothing.
case " $PHASES " in
*" temporal "*)
    found=$OUT/attention.json
    [ -f "$found" ] || found=$WORKDIR/attention.json
    if [ -f "$found" ]; then
        best=$(python3 -c "import json, sys; from animatediff_blender.backend.bench.attention import best_temporal_backend as b; print(b(json.load(open(sys.argv[1]))) or '')" "$found")
        if [ -n "$best" ]; then
            phase temporal 220 --case quality --repeats 1 --profile --lever default --lever "default+temporal-sdpa:$best"
        else
            say "phase temporal: no backend beats torch's choice at the temporal shapes ($found): nothing to measure"
        fi
    else
        say "phase temporal: no attention.json yet (run the attention phase first)"
    fi
    ;;
esac
# 5d. (Not in the default list; run 4's findings, for the fifth GPU session.)  Run 4's
#    profiles had the motion modules' attention (16-frame sequences over 512-24576 x 8 heads)
#    at 1.5-5 TFLOP/s in cuDNN's flash kernel, torch's choice: ~25 ms of a 109 ms quality step
#    and about half of a 64-frame one.  `tquality`: whole quality jobs with each other temporal
#    implementation against the default, each profiled (attention by shape); `tlong64`: the
#    fastest of them (`bench-report --fastest`: >3 % faster than the default, frames within
#    40 dB of stock; else the default itself) on 64 frames, against stock (run 4's default:
#    16.79 s, 10.98 GiB, before the feed-forward chunks joined the default).
phase tquality 240 --case quality --repeats 1 --profile --profile-every-lever --lever default \
    --lever default+temporal-sdpa:math --lever default+temporal-sdpa:efficient --lever default+temporal-sdpa:reduced
case " $PHASES " in
*" tlong64 "*)
    best=""
    [ -f "$OUT/tquality.json" ] && best=$(cli bench-report --fastest quality "$OUT/tquality.json")
    if [ -z "$best" ]; then
        # Still worth the time: the default's long64 since the VAE and feed-forward changes
        # (its peak: the feed-forward chunks' estimate is ~2.6 GiB less than run 4's).
        say "phase tlong64: no temporal lever beat the default on quality: the default on long64"
        best=default
    fi
    phase tlong64 200 --case long64 --repeats 0 --profile --profile-case long64 --lever "$best"
    ;;
esac
# 5f. (Not in the default list; for the sixth GPU session.)  The project's Triton kernel for
#    the motion modules' 16-token attention (`temporal-sdpa:triton`, engine/short_attention.py:
#    several sequences per tile; run 5 had these calls at ~400 of a 64-frame step's 668 ms,
#    1.3-3 TFLOP/s, ~20x slower than memory speed).  `kcheck` (~40 s): each temporal shape of
#    quality and long64 timed alone with torch's choice, the efficient backend and the kernel
#    at 32/64/128 tile rows, each checked against float32 maths (a kernel that fails to build
#    shows here, cheaply).  `kquality`: whole quality jobs, the default against the kernel,
#    against stock, both profiled; `klong64`: the kernel on 64 frames against stock (no
#    default row: run 5's, 16.887 s, is on the same kind of card).
case " $PHASES " in
*" kcheck "*)
    t=$(left)
    [ "$t" -gt 90 ] && t=90
    [ "$t" -lt 20 ] && { say "SKIPPED phase kcheck: ${t}s left"; t=0; }
    [ "$t" -gt 0 ] && say "phase kcheck (up to ${t}s): bench-attention, temporal shapes"
    kargs="--case quality --case long64 --iters 10 --backend auto --backend efficient --backend triton:32 --backend triton --backend triton:128"
    case " $EXTRA " in *" tiny "*) kargs="$kargs --size tiny --device cpu --iters 1" ;; esac
    if [ "$t" -gt 0 ]; then
        # shellcheck disable=SC2086  # kargs is a list of arguments
        timeout --kill-after=10 "$t" bash -c 'cli "$@"' cli \
            bench-attention $kargs --json "$OUT/kcheck.json" 2>&1 | grep --line-buffered -v -e "^  spatial" -e "^  cross" | tee -a "$LOG"
        say "phase kcheck ended with exit code ${PIPESTATUS[0]}"
    fi
    ;;
esac
# A kernel that `kcheck` did not see run right at every temporal shape (or no kcheck.json at
# all) would only fail again after minutes of compiling: the memory lever that is also still
# unmeasured runs instead.
kernel_ran=yes
case " $PHASES " in
*" kcheck "*)
    if ! python3 -c "
import json, sys
timings = [t for c in json.load(open(sys.argv[1]))['cases'] for s in c['shapes'] if s['kind'] == 'temporal'
           for t in s['timings'] if t['backend'] == 'triton']
sys.exit(0 if timings and all(t['us'] and t['max_abs_err'] is not None and t['max_abs_err'] < 2e-2 for t in timings) else 1)
" "$OUT/kcheck.json" 2>>"$LOG"; then
        kernel_ran=no
        say "kcheck: the Triton kernel did not run right at every temporal shape (kcheck.json): split-batch on long64 instead"
        phase kquality 170 --case long64 --engine-only --repeats 0 --lever default+split-batch
    fi
    ;;
esac
if [ "$kernel_ran" = yes ]; then
    # The candidate default: the kernel, and the long clips' memory lever (`split-batch` leaves
    # a 16-frame clip's 32 images whole: on quality it is the kernel alone).  On long64 the
    # peak is split-batch's (the kernel allocates what SDPA does); the kernel's share of the
    # time is kcheck's "ms per UNet call" (temporal, auto against triton) x calls.
    phase kquality 200 --case quality --repeats 1 --profile --profile-every-lever --lever default \
        --lever "$CANDIDATE"
    phase klong64 200 --case long64 --repeats 0 --profile --profile-case long64 --lever "$CANDIDATE"
fi
# 5e. (Not in the default list.)  CUDA graphs on lightning: run 4's job timeline had the GPU
#    idle 66 ms of a 519 ms job inside the UNet calls, waiting for the host (1,167 gaps: the
#    regional compile's 65 regions per call, each entered from Python; fewer without the
#    profiler: ~35-50 ms of the unprofiled denoise is host work); `reduce-overhead`
#    replays each region's kernels as one graph; `compile-full` (last: cut first if time runs
#    out) enters one compiled UNet per call instead of ~60 regions.
phase graphs 200 --case lightning --case server --repeats 3 --profile --profile-every-lever --lever default \
    --lever default+compile:reduce-overhead --lever default+compile-full
# 5c. (Not in the default list.)  Whatever a short follow-up call needs on the warm machine:
#    BENCH_PHASES=custom BENCH_CUSTOM="--case lightning --lever ..." [BENCH_CUSTOM_NEED=S].
# shellcheck disable=SC2086  # BENCH_CUSTOM is a list of arguments
phase custom "${BENCH_CUSTOM_NEED:-60}" ${BENCH_CUSTOM:-}
# 6. Compile modes (long autotuning; only when time is left).
phase modes 150 --case quality --repeats 1 --lever compile:max-autotune-no-cudagraphs --lever compile:reduce-overhead

# 7. (Not in the default list: BENCH_PHASES=verify.)  A short check of the engine's
#    default after a change: quality against stock (+ profile), long64 and the server
#    case engine-only, in one process (one model load, one compile of each shape).
phase verify 100 --case quality --case long64 --case server --anchor quality --repeats 0 --profile

# 8. The server's CPU side on this machine's cores (no GPU, ~15 s): an engine stand-in with
#    the H200's lightning times; prints what the server adds before and after the engine.
case " $PHASES " in
*" serverside "*)
    say "phase serverside: bench-server"
    timeout --kill-after=10 "$(left)" bash -c 'cli "$@"' cli \
        bench-server --png-compress-level 1 --png-compress-level 0 --json "$OUT/serverside.json" 2>&1 |
        grep --line-buffered "bench-server" | tee -a "$LOG"
    ;;
esac

# Every target's verdict from this call's result files (`bench-report`; the serverside,
# attention and kcheck files are bench-server's and bench-attention's, not bench results).
reports=$(find "$OUT" -maxdepth 1 -name '*.json' ! -name serverside.json ! -name attention.json ! -name kcheck.json | sort)
if [ -n "$reports" ]; then
    say "targets (bench-report):"
    # shellcheck disable=SC2086  # one argument per file
    cli bench-report $reports 2>&1 | tee -a "$LOG"
    # The candidate default (the Triton kernel phases) judged on its own rows too.
    # shellcheck disable=SC2086  # one argument per file
    if grep -qF "engine[$CANDIDATE]" $reports; then
        say "targets for the candidate $CANDIDATE (bench-report --lever):"
        # shellcheck disable=SC2086  # one argument per file
        cli bench-report --lever "$CANDIDATE" $reports 2>&1 | grep -v '^|.*|.*|.*|.*|.*|' | tee -a "$LOG"
    fi
fi

# The device tool hands back at most 8 files from $OUT: past that, everything but the log
# goes into one tar (JSON per phase, gzipped job traces).
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && find . -maxdepth 1 -type f ! -name bench.log ! -name results.tar -printf '%P\n' |
        tar cf results.tar --remove-files -T -) && say "more than 8 result files: packed into results.tar"
fi
say "done in $(($(date +%s) - START))s; results: $(ls "$OUT" | tr '\n' ' ')"
