#!/usr/bin/env bash
# The one prepared command for the project's GPU machine (docs/gpu.md has the exact invocation):
#
#   tools/device_gpu_check.sh OUTDIR [tools/gpu_check.py flags, e.g. --only throughput_bf16,vs_transformers]
#
# 1. installs the carried wheels (wheels/cp<python>, from `make gpu-wheels`) into a fresh target directory with
#    `pip install --no-index --no-deps --target` (the machine has no network) and puts it first on PYTHONPATH;
# 2. runs tools/gpu_check.py from this checkout: every check isolated and timed, gpu_check.json + gpu_check.md
#    rewritten in OUTDIR after each one;
# 3. if the process dies (a crash, a CUDA error that poisons the context, the time limit), records the check it
#    died in as crashed with the log's tail, and resumes the remaining checks in a fresh process;
# 4. keeps the whole run within GPU_CHECK_LIMIT_S (default 470 s): checks that could not start in time are
#    recorded as "not run".
# OUTDIR ends up with gpu_check.json, gpu_check.md and gpu_check.log (everything printed, pip's output included).
# Exit status: 0 every check ok (or not installed here), 1 a check failed, 2 no GPU.
# Environment: PYTHON (python3), GPU_CHECK_WHEELS (wheels/cp<ver> of that Python), GPU_CHECK_SITE (a new
# temporary directory), GPU_CHECK_LIMIT_S (470).
set -u -o pipefail
out=${1:?usage: tools/device_gpu_check.sh OUTDIR [tools/gpu_check.py flags]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
limit=${GPU_CHECK_LIMIT_S:-470}
deadline=$((SECONDS + limit))
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu_check.log
pyver=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheels=${GPU_CHECK_WHEELS:-$repo/wheels/$pyver}
site=${GPU_CHECK_SITE:-$(mktemp -d /tmp/megatron_zero_site.XXXXXX)}

{
  echo "device_gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $("$py" -V 2>&1) ($(command -v "$py"))"
  echo "device_gpu_check: wheels $wheels -> $site; limit ${limit} s; flags: $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
} | tee "$log"

shopt -s nullglob
whls=("$wheels"/*.whl)
if [ ${#whls[@]} -eq 0 ]; then
  echo "device_gpu_check: no wheels in $wheels: run 'make gpu-wheels' and carry that folder (docs/gpu.md)" | tee -a "$log"
elif ! "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "${whls[@]}" >>"$log" 2>&1; then
  echo "device_gpu_check: pip install of ${whls[*]} failed (its output is above in $log)" | tee -a "$log"
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo" || exit 2

resume=()
rc=0
for attempt in 1 2 3 4 5 6; do
  left=$((deadline - SECONDS))
  budget=$((left - 120))  # a check started up to then has two minutes to finish before the hard limit
  [ "$budget" -lt 0 ] && budget=0
  [ "$left" -lt 40 ] && break
  echo "device_gpu_check: attempt $attempt, ${left} s left, checks start for ${budget} s" | tee -a "$log"
  timeout --kill-after=5 $((left - 25)) "$py" tools/gpu_check.py --output-dir "$out" --time-budget "$budget" \
    "${resume[@]}" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in 0 | 1 | 2) exit "$rc" ;; esac
  echo "device_gpu_check: gpu_check.py exited with status $rc: resuming in a fresh process" | tee -a "$log"
  resume=(--resume --previous-exit "$rc" --log-file "$log")
done
# out of time (or attempts): record the check that was running as crashed and the rest as not run
[ ${#resume[@]} -eq 0 ] && resume=(--resume --previous-exit "$rc" --log-file "$log")
"$py" tools/gpu_check.py --output-dir "$out" --time-budget 0 "${resume[@]}" "$@" >>"$log" 2>&1
exit 1
