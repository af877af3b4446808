# Sourced by bench/gpu.sh and bench/gpu_train.sh (after they set OUT, PY and NAME):
#   start              a temporary folder for the script (TMPDIR: every checkpoint, compile cache and run folder goes
#                      there), removed when the script ends however it ends short of a SIGKILL; folders of earlier
#                      runs killed outright are removed here
#   preflight          bench/preflight.py as a step, then its findings (PF_PYTEST, PF_COMPILE, PF_HF, PF_GPUS,
#                      PF_DISK_GB; 0 where it did not say)
#   step NAME SECONDS CMD...
#                      CMD under `timeout` (SIGTERM, then SIGKILL 10 s later), never past what is left of BUDGET
#                      seconds since the start; CMD sees BENCH_TIME_LIMIT, its limit less 15 s, and the benchmarks
#                      stop their parts by it and write their JSON. Its exit code and seconds are logged and kept in
#                      $OUT/steps.tsv, and $OUT/$NAME.json is merged again after every step. A failed step does not
#                      stop the script.
#   skip NAME WHY      a step not run, with the reason, logged and kept likewise
BUDGET=${BUDGET:-480}

start() {
  local root=${TMPDIR:-/tmp} d
  for d in "$root"/bench-"$NAME".*; do  # left by a run that was killed outright (its process is gone)
    [ -d "$d" ] && ! kill -0 "${d##*.}" 2>/dev/null && rm -rf "$d" && echo "removed $d, left by an earlier run"
  done
  BENCH_TMP="$root/bench-$NAME.$$"
  mkdir -p "$BENCH_TMP" "$OUT"
  export TMPDIR=$BENCH_TMP
  trap 'rm -rf "$BENCH_TMP"' EXIT
  trap 'exit 143' TERM
  trap 'exit 130' INT
  : > "$OUT/steps.tsv"
}

preflight() {
  rm -f "$OUT/preflight.env"
  step preflight 45 $PY bench/preflight.py --device "$DEV" --out "$OUT" --compile-timeout 30
  PF_PYTEST=0 PF_COMPILE=0 PF_HF=0 PF_GPUS=0 PF_DISK_GB=0
  [ -f "$OUT/preflight.env" ] && source "$OUT/preflight.env"
}

step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    skip "$name" "the budget of $BUDGET s is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit $limit s): $*"
  local t0=$SECONDS rc
  BENCH_TIME_LIMIT=$((limit - 15)) timeout -k 10 "$limit" "$@"
  rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$OUT/steps.tsv"
  merge
}

skip() {
  echo "=== $1: skipped ($2)"
  printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >> "$OUT/steps.tsv"
  merge
}

# $OUT/$NAME.json: the steps (exit code, seconds, limit), the preflight, and every benchmark JSON of this script
merge() {
  $PY - "$OUT" "$NAME" $PREFIXES <<'PY'
import glob, json, os, sys
out, name, prefixes = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
merged = {"steps": {}}
for line in open(os.path.join(out, "steps.tsv")):
    step, rc, seconds, limit = line.rstrip("\n").split("\t")
    merged["steps"][step] = {"exit_code": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds), "limit": int(limit)}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    base = os.path.basename(f)[:-5]
    if base == "preflight" or base.startswith(prefixes):
        try:
            merged[base] = json.load(open(f))
        except ValueError as e:
            merged[base] = {"error": f"unreadable: {e}"}
tmp = os.path.join(out, f"{name}.json.tmp")
json.dump(merged, open(tmp, "w"), indent=1)
os.replace(tmp, os.path.join(out, f"{name}.json"))
PY
}
