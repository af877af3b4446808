# Sourced by bench/gpu.sh and bench/gpu_train.sh: step NAME SECONDS CMD... runs CMD with a time limit and logs
# its exit code and seconds; a failed step does not stop the script.
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: rc $? in $((SECONDS - t0)) s"
}
# the merged JSON of a script: merge OUT NAME PREFIX... writes OUT/NAME.json from OUT/<prefix>*.json
merge() {
  local out=$1 name=$2; shift 2
  $PY - "$out" "$name" "$@" <<'PY'
import glob, json, os, sys
out, name, prefixes = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
files = [f for f in sorted(glob.glob(os.path.join(out, "*.json"))) if os.path.basename(f).startswith(prefixes)]
json.dump({os.path.basename(f)[:-5]: json.load(open(f)) for f in files}, open(os.path.join(out, f"{name}.json"), "w"), indent=1)
print(f"{len(files)} benchmark files merged into {os.path.join(out, name + '.json')}")
PY
}
