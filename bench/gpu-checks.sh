#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine (no network there).
#
#   bash bench/gpu-checks.sh            # writes logs and results under $OUT (default /tmp/cdae-gpu)
#
# 1. the gpu-marked tests and the engine tests (where `auto` now picks torch-cuda), in the
#    background a config sweep on the GPU (experiments/bright_sweep.py);
# 2. the device path's parity with the NumPy path on the GPU (bench/device_parity.py);
# 3. then, alone on the machine, the engine benchmark at 1024² and 2048² uint16: torch-cuda with its
#    pre/post-processing on the GPU (device_pre_post, the default), torch-cuda+host (the same steps in
#    NumPy on the host) and the passthrough engine, in one run: $OUT/engine-<gpu>.json and .png, each
#    torch-cuda row with vs_host_pre_post (its frames/s and latency over the +host row's) and vs_guard_graphs (over
#    the row with the guard replayed as a CUDA graph, backend_options.guard_graphs) and vs_device_statistics (over the
#    row whose offset, scale, full well and noise model are read on the GPU, not the host);
#    before it, the guard's cost on the CPU by thread count (bench/guard.py: $OUT/guard-<cpu>.json).
# 4. the device path's stage profile (bench/device_profile.py) as it runs by default, with its statistics on the GPU,
#    and with the guard as a CUDA graph.
# STAGES="parity bench tests" picks and orders them (default: parity bench profile tests guard).
# Python packages the machine's image lacks, cdae included, travel as wheels in .whl/ (bench/gpu-wheels.sh makes them).
# Everything written under $OUT is also packed into $OUT/all.tgz at the end (a device run returns 8 files at most).
set -u
OUT=${OUT:-/tmp/cdae-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 EPICS_CA_AUTO_ADDR_LIST=NO MPLBACKEND=Agg
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# cdae itself travels as a wheel built from this tree (pip wheel --no-deps -w .whl .): no build tools needed there
export PATH=/tmp/site/bin:$PATH CDAE_MODELS=${CDAE_MODELS:-$PWD/models}
$PY -c "import cdae" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, cdae; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

SWEEP_S=${SWEEP_S:-330}; TEST_S=${TEST_S:-330}; BENCH_S=${BENCH_S:-200}  # tests and sweep run side by side
ROOT=$PWD
tests() {
    ( timeout "$SWEEP_S" $PY experiments/bright_sweep.py ${SWEEP_VARIANTS:+--variants $SWEEP_VARIANTS} --device cuda --epochs "${SWEEP_EPOCHS:-3}" --parallel 8 ${SWEEP_ARGS:-} \
          --out /tmp/sweep >"$OUT/sweep.log" 2>&1; cp /tmp/sweep/sweep.json /tmp/sweep/sweep.png "$OUT/" 2>/dev/null ) &
    local sweep=$!
    # from outside the tree: the source's cdae/ folder must not shadow the installed package
    ( cd /tmp && timeout "$TEST_S" $PY -m pytest -q -p no:cacheprovider -p no:benchmark -m "not slow" -W "ignore::DeprecationWarning" \
        ${TESTS:-"$ROOT/tests/engine" "$ROOT/tests/training/test_train.py" "$ROOT/tests/deploy/test_export.py"} ) >"$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -15 "$OUT/tests.log"
    wait $sweep
    tail -12 "$OUT/sweep.log"
}
# the device path's parity with the NumPy path on this GPU, stage by stage and whole (device-parity-cuda.json)
parity() {
    ( cd /tmp && timeout "${PARITY_S:-90}" $PY "$ROOT/bench/device_parity.py" --device cuda --max-side "${PARITY_SIDE:-1024}" \
        --out "$OUT" ) >"$OUT/parity.log" 2>&1
    echo "parity rc=$?"; tail -20 "$OUT/parity.log"
}
# the guard's impulse pass on the machine's many CPU cores (its threads; on 2 vCPUs two were slower):
# guard-<cpu>.json beside the rest
guard() {
    ( cd /tmp && timeout "${GUARD_S:-150}" $PY "$ROOT/bench/guard.py" --sizes 1024,2048 --threads 1,2,4,8,16 \
        --precision fp32 --out "$OUT" ) >"$OUT/guard.log" 2>&1
    echo "guard rc=$?"; tail -4 "$OUT/guard.log"
}
# where the device path's time goes, stage by stage, in its three forms (device-profile-<gpu>-<size>[-variant].json)
profile() {
    for size in ${PROFILE_SIZES:-1024 2048}; do
        for variant in "" --device-statistics --guard-graphs; do
            ( cd /tmp && timeout "${PROFILE_S:-60}" $PY "$ROOT/bench/device_profile.py" --size "$size" $variant \
                --out "$OUT" ) >"$OUT/profile.log" 2>&1
            echo "profile $size ${variant:-default} rc=$?"; grep -E "^frame p50|^(frame_statistics|host_noise_model|guard|run_tiled|detect_full_well|measure_noise) " "$OUT/profile.log" | cut -c1-160
        done
    done
}
bench() {
    ( cd /tmp && timeout "$BENCH_S" $PY "$ROOT/bench/engine.py" --backends "${BENCH_BACKENDS:-torch-cuda,torch-cuda+host,torch-cuda+device-stats,torch-cuda+guard-graphs}" \
        --sizes "${BENCH_SIZES:-1024,2048}" --frames "${BENCH_FRAMES:-60}" ${BENCH_ARGS:-} --out "$OUT" ) >"$OUT/bench.log" 2>&1
    echo "bench rc=$?"; tail -12 "$OUT/bench.log"
    $PY - "$OUT" <<'PY' || true
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("engine-*.json")):
    for backend, rows in json.loads(p.read_text())["backends"].items():
        for r in rows:
            print(p.name, backend, r["size"], r["pipelined"]["frames_per_s"], "frames/s, p50", r["latency_ms"]["p50"],
                  "ms, engine total p50", r["engine_total_ms_p50"], "ms", r.get("vs_host_pre_post", ""))
PY
}
# STAGES: which checks, in which order (parity and the benchmark first: a lease can be short)
for stage in ${STAGES:-parity bench profile tests guard}; do
    case $stage in tests|parity|guard|bench|profile) $stage ;;
        *) echo "unknown stage $stage (tests, parity, guard, bench, profile)"; exit 2 ;; esac
done
# a device run brings back at most 8 files: everything, in one archive beside them (all.tgz)
tar czf /tmp/all.tgz -C "$OUT" . 2>/dev/null && mv /tmp/all.tgz "$OUT/all.tgz"
