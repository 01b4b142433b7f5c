#!/usr/bin/env bash
# Device check: the pipeline's costly loops on a lent GPU, beside the same on the CPU.
#
#   bash bench/device.sh [--limit SECONDS] [--generator [--generator-limit SECONDS]]
#   bash bench/device.sh --cpu          CPU smoke run (tiny sizes; checks the code, not the cost)
#
# With CUDA: bench/device.py on the GPU (paper settings, 128 and 256 px; about 60 % of the
# limit) while nvidia-smi samples utilisation and memory every 500 ms, then the same
# measurements on the CPU with the time left (those that do not fit are skipped; Histo-DD's
# loop is extrapolated there), then both side by side and the `name: value` lines (GPU figures,
# CPU figures prefixed cpu_, utilisation mean/max), saved to results/bench/device.txt. Without
# CUDA, or with --cpu: the smoke run on the CPU only (results/bench/smoke/device.txt). The
# whole run is held to --limit seconds (default 480) by `timeout`; a stopped run keeps the
# figures measured so far (results/bench/device/*.txt).
#
# --generator (GPU only, when results/pcam/patches.zarr exists), after the measurements and
# outside their limit, within --generator-limit seconds (default 420): the PCam generator
# chain at the U-ViT `small` preset through the pipeline's own rules (train_autoencoder,
# train_encoder, train_generator, sample_synthetic, generator_quality) with the PCam overlay,
# in results/bench/device_pcam/ (the patch store linked in; resumable: a stopped run keeps its
# checkpoints, the next call goes on from them), then its quality JSON and in-domain FID beside
# the CPU tiny preset's 143.3 (docs/methods/generators.md).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

CPU=0 GENERATOR=0 LIMIT=480 GEN_LIMIT=420
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --generator) GENERATOR=1 ;;
        --limit) LIMIT="$2"; shift ;;
        --generator-limit) GEN_LIMIT="$2"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "device.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

START=$SECONDS
left() { echo $((LIMIT - (SECONDS - START))); }

if [ "$CPU" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "# device.sh: no CUDA device; running the CPU smoke run (--cpu)"
    CPU=1
fi

if [ "$CPU" = 1 ]; then
    [ "$GENERATOR" = 1 ] && echo "# generator: skipped (it trains on a GPU only)"
    # smoke sizes on the CPU; a GPU, if any, hidden
    CUDA_VISIBLE_DEVICES="" timeout -k 10 "$(left)" "$PY" bench/device.py --smoke --device cpu \
        --figures results/bench/smoke/device_partial.txt --out results/bench/smoke/device.txt
    rc=$?
    [ $rc = 124 ] && echo "# device.sh: stopped at the ${LIMIT} s limit" >&2
    exit $rc
fi

OUT=results/bench/device
mkdir -p "$OUT"
rm -f "$OUT/cuda.txt" "$OUT/cpu.txt" "$OUT/gpu_util.csv" results/bench/device_generator.txt

# 1. the GPU run, utilisation sampled beside it
SMI=""
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 \
        > "$OUT/gpu_util.csv" 2>/dev/null &
    SMI=$!
fi
CUDA_LIMIT=$((LIMIT * 6 / 10))
timeout -k 10 "$CUDA_LIMIT" "$PY" bench/device.py --device cuda --work "$OUT/work" \
    --budget-s $((CUDA_LIMIT - 60)) --figures "$OUT/cuda.txt" --out "$OUT/cuda_final.txt"
cuda_rc=$?
[ -n "$SMI" ] && kill "$SMI" 2>/dev/null && wait "$SMI" 2>/dev/null
[ $cuda_rc = 124 ] && echo "# device.sh: the GPU run stopped at its ${CUDA_LIMIT} s share; figures so far kept"

# 2. the same measurements on the CPU, as far as the time left allows
CPU_LIMIT=$(($(left) - 20))
if [ "$CPU_LIMIT" -gt 60 ]; then
    CUDA_VISIBLE_DEVICES="" timeout -k 10 "$CPU_LIMIT" "$PY" bench/device.py --device cpu \
        --work "$OUT/work" --budget-s $((CPU_LIMIT - 45)) --full-loop-max-s 0 \
        --figures "$OUT/cpu.txt" --out "$OUT/cpu_final.txt"
    [ $? = 124 ] && echo "# device.sh: the CPU run stopped at its ${CPU_LIMIT} s share; figures so far kept"
else
    echo "# device.sh: no time left for the CPU run"
fi

# 3. side by side, and the name: value lines
"$PY" bench/device.py --summarise --cuda-figures "$OUT/cuda.txt" --cpu-figures "$OUT/cpu.txt" \
    --gpu-log "$OUT/gpu_util.csv" --out results/bench/device.txt
echo "device_check_s: $((SECONDS - START))"

# 4. optional: the PCam generator at the small U-ViT preset, through the pipeline's rules
if [ "$GENERATOR" = 1 ]; then
    if [ ! -d results/pcam/patches.zarr ]; then
        echo "# generator: skipped (results/pcam/patches.zarr is missing: carry it with the tree)"
    else
        W=results/bench/device_pcam
        mkdir -p "$W/results/pcam/sources" "$W/no_source"
        # linked once: a fresh link would be a newer input and retrain what an earlier call built
        [ -e "$W/results/pcam/patches.zarr" ] || ln -s "$ROOT/results/pcam/patches.zarr" "$W/results/pcam/patches.zarr"
        [ -e "$W/config.yaml" ] || ln -s "$ROOT/config.yaml" "$W/config.yaml"
        # The ingest rule's inputs are evaluated even though it is not allowed to run: an empty
        # source folder and its (empty, old) listing, so the linked store counts as up to date.
        [ -f "$W/results/pcam/sources/ingest.txt" ] || : > "$W/results/pcam/sources/ingest.txt"
        touch -d 2000-01-01 "$W/no_source" "$W/results/pcam/sources/ingest.txt"
        cat > "$W/uvit_small.yaml" <<EOF
datasets:
  pcam:
    root: $ROOT/$W/no_source
    generate:
      checkpoint_every: 250
      generator: {preset: small}
EOF
        echo "# generator: snakemake in $W (log: $W/snakemake.log), at most ${GEN_LIMIT} s"
        gen_start=$SECONDS
        # the target first: options of several values (--configfile, --allowed-rules) would take it in
        timeout -k 30 "$GEN_LIMIT" "$PY" -m snakemake results/pcam/generate/uvit_quality.json \
            --snakefile "$ROOT/Snakefile" --directory "$W" \
            --configfile "$ROOT/configs/pcam.yaml" "$W/uvit_small.yaml" \
            --workflow-profile "$ROOT/workflow/profiles/default" \
            --cores "$(nproc)" --resources gpu=1 --nolock --rerun-incomplete \
            --allowed-rules train_autoencoder train_encoder train_generator sample_synthetic generator_quality \
            > "$W/snakemake.log" 2>&1
        gen_rc=$?
        grep -E "^(rule |Finished job|Error|.*Exception)" "$W/snakemake.log" | tail -n 40
        Q="$W/results/pcam/generate/uvit_quality.json"
        if [ -f "$Q" ]; then
            cat "$Q"
            "$PY" - "$Q" "$((SECONDS - gen_start))" > results/bench/device_generator.txt <<'EOF'
import json, sys
q = json.load(open(sys.argv[1]))
print(f"generator_fid_in_domain_small: {q['fid_in_domain']:.1f}")
print("generator_fid_in_domain_tiny_cpu: 143.3")
print(f"generator_precision_small: {q['precision']:.3f}")
print(f"generator_recall_small: {q['recall']:.3f}")
print(f"generator_chain_s_this_call: {sys.argv[2]}")
EOF
        else
            echo "# generator: not finished (snakemake exit $gen_rc); --generator again resumes from"
            echo "#   $W/results/pcam/generate/*.ckpt; the end of $W/snakemake.log:"
            tail -n 25 "$W/snakemake.log" | sed 's/^/#   /'
            ls "$W"/results/pcam/generate/ 2>/dev/null | sed 's/^/#   /'
        fi
    fi
fi

# the figures last, whole (the generator's output may have pushed the summary up)
echo "== figures =="
cat results/bench/device.txt
if [ "$GENERATOR" = 1 ] && [ -f results/bench/device_generator.txt ]; then
    cat results/bench/device_generator.txt
fi

# a GPU run stopped by its share of the limit still reports; any other failure is the exit status
if [ $cuda_rc != 0 ] && [ $cuda_rc != 124 ]; then exit $cuda_rc; fi
exit 0
