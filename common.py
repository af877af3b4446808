"""
Plumbing shared by every script: JSON Lines reading with clear errors, resumable sharded writing, distributed
start-up, model loading, prompt templates, dtype parsing and the engine flags. Nothing here knows an algorithm.
"""
import json
import os

import torch

from model import Transformer
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# JSON Lines stages: reading with clear errors, resumable sharded writing, distributed set-up


def read_jsonl(path, required=("id",), what="record"):
    """Read a JSONL file; malformed lines, missing fields, duplicate ids and empty files are errors naming
    the file and line."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise SystemExit(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise SystemExit(f"{path}:{n}: missing field {key!r} in {what}")
            if "id" in rec:
                rid = str(rec["id"])
                if rid in seen:
                    raise SystemExit(f"{path}:{n}: duplicate id {rid!r} (first on line {seen[rid]})")
                seen[rid] = n
            records.append(rec)
    if not records:
        raise SystemExit(f"{path}: empty file (no {what}s)")
    return records


def shard_path(out, rank):
    root, ext = os.path.splitext(out)
    return f"{root}.rank{rank}{ext}"


def _repair_tail(path):
    """Cut a partial last line left by a killed writer (the record in flight); return the good records."""
    with open(path, "rb") as f:
        data = f.read()
    good_end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:good_end].splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"{path}:{n}: malformed JSON in a partly written output; fix or delete it") from None
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def done_records(out):
    """Records already written by an earlier (possibly killed, possibly other-world-size) run of a stage."""
    recs = []
    if os.path.exists(out):
        recs += _repair_tail(out)
    for shard in _shard_files(out):
        recs += _repair_tail(shard)
    return recs


def _shard_files(out):
    """The per-rank shards `<out root>.rank<r><ext>` next to `out`, of any world size."""
    folder, base = os.path.split(os.path.abspath(out))
    root, ext = os.path.splitext(base)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if n.startswith(root + ".rank") and n.endswith(ext)]


class ShardWriter:
    """Appends finished records to this rank's shard, flushed and fsynced one by one."""

    def __init__(self, out, rank):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        self.path = shard_path(out, rank)
        self.f = open(self.path, "a", encoding="utf-8")

    def write(self, rec):
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        self.f.close()


def merge_shards(out, order):
    """Rank 0: gather the output and every shard into `out`, one record per id, in the order of `order`
    (the ids of the input file), written atomically; the shards are then removed."""
    by_id = {}
    for rec in done_records(out):
        by_id.setdefault(str(rec["id"]), rec)
    rank = {rid: k for k, rid in enumerate(order)}
    recs = sorted(by_id.values(), key=lambda r: rank.get(str(r["id"]), len(rank)))
    write_jsonl(out, recs)
    for shard in _shard_files(out):
        os.remove(shard)
    return recs


def write_jsonl(path, records):
    """Write a whole file atomically (merged outputs and derived files such as pairs)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def init_distributed():
    """(rank, world, device) under torchrun or plain python; sets up the process group when world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def keep_freed_memory():
    """On Linux with glibc, keep freed memory in the process instead of returning it to the system: large
    CPU tensors are otherwise fresh mappings whose pages fault in again on every step, which costs a training
    step up to half its time on some (virtualised) machines. The price: the process keeps its peak memory."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameter numbers from <malloc.h>
    # large blocks from the heap instead of their own mappings; give back only free tops over 2 GiB
    ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    if not ok:
        print("note: mallopt refused the memory settings; running with the allocator's defaults", flush=True)


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def print0(*a, **kw):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **kw, flush=True)


def load_model(path, device, dtype="auto", chat_format=None):
    """Model and tokenizer of an HF folder; `None` means the embedded default (converted on first use)."""
    if path is None:
        from data.prepare_default import ensure_default_model
        path = ensure_default_model()
    model = Transformer.from_pretrained(path, device=device, dtype=parse_dtype(dtype, device)).eval()
    return model, Tokenizer.from_pretrained(path, chat_format), path


def stable_seed(seed, rid) -> int:
    """A per-record seed from the run's seed and the record id (same on every rank and every re-run)."""
    h = 0
    for ch in f"{seed}:{rid}":
        h = (h * 131 + ord(ch)) % (1 << 61)
    return h


def add_engine_args(parser):
    g = parser.add_argument_group("engine")
    g.add_argument("--max-rows", type=int, default=64, help="sequences decoded together")
    g.add_argument("--max-cache-tokens", type=int, default=1 << 20, help="bound on the KV cache in tokens: slots x (longest prompt + samples per slot x new tokens)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU; static shapes)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--chat-format", default=None, choices=("llama3", "chatml"), help="override the detected chat format")


# -----------------------------------------------------------------------------
# Prompt templates, plugins, dtypes

TEMPLATES = os.path.join(ROOT, "data", "templates")

# -----------------------------------------------------------------------------
# Templates


def load_template(path, required):
    """Read a prompt template; every `{name}` in `required` must appear in it."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: template not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        raise SystemExit(f"{path}: template lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return text


def render(template, **fields):
    """Fill `{name}` placeholders by plain replacement (user text may hold braces, so no str.format)."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template.strip()


def load_function(spec):
    """`module:function` -> the function (the module is imported from the Python path)."""
    import importlib
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--judge-fn: cannot load {spec!r} ({e})") from None


def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (bf16 matmuls are far slower than fp32 on CPUs without AVX-512)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise SystemExit(f"--dtype: unknown dtype {name!r} (choose auto, {', '.join(table)})")
    return table[name]


