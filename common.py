"""
Plumbing shared by every script: JSON Lines reading with clear errors, resumable sharded stage outputs and
their settings, a lock on a run folder, distributed start-up, resumable training state, model loading, prompt
templates and flag checks. Nothing here knows an algorithm.
"""
import datetime
import hashlib
import json
import math
import os
import re
import shutil

import torch
from safetensors import SafetensorError

from model import Transformer
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(ROOT, "data", "templates")

# -----------------------------------------------------------------------------
# Reading JSON Lines


class Records(list):
    """The records of a JSONL file, with the line each one came from (for `file:line` messages)."""

    def __init__(self, path, records, lines):
        super().__init__(records)
        self.path, self.lines = path, lines

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"


# a \ud800-\udfff escape: json.loads turns it into a lone surrogate, which no UTF-8 writer accepts
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_jsonl(path, required=("id",), what="record", check=None):
    """Read a JSONL file. Malformed lines, text that is not UTF-8 or not valid Unicode, missing fields,
    duplicate ids, empty files and whatever `check(record)` objects to (it returns a message or None) are
    errors naming the file and the line."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file")
    if os.path.isdir(path):
        raise SystemExit(f"{path}: is a directory, not a JSONL file")
    records, lines, seen = [], [], {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise SystemExit(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            if SURROGATE_ESCAPE.search(line):
                try:
                    json.dumps(rec, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise SystemExit(f"{path}:{n}: text is not valid Unicode (an unpaired surrogate escape "
                                     "such as \\ud800)") from None
            for key in required:
                if key not in rec:
                    raise SystemExit(f"{path}:{n}: missing field {key!r} in {what}")
            if "id" in rec:
                rid = str(rec["id"])
                if rid in seen:
                    raise SystemExit(f"{path}:{n}: duplicate id {rid!r} (first on line {seen[rid]})")
                seen[rid] = n
            problem = check(rec) if check else None
            if problem:
                raise SystemExit(f"{path}:{n}: {problem}")
            records.append(rec)
            lines.append(n)
    if not records:
        raise SystemExit(f"{path}: empty file (no {what}s)")
    return Records(path, records, lines)


def check_prompt_fields(rec):
    """The fields every prompt-carrying record shares: a non-empty `prompt`, an optional string `system`."""
    if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
        return "`prompt` must be a non-empty string"
    if rec.get("system") is not None and not isinstance(rec["system"], str):
        return "`system` must be a string"
    return None


# -----------------------------------------------------------------------------
# Resumable stage outputs: shards, merging, settings


def shard_path(out, rank):
    root, ext = os.path.splitext(out)
    return f"{root}.rank{rank}{ext}"


def settings_path(out):
    return os.path.splitext(out)[0] + ".settings.json"


def _repair_tail(path):
    """Cut a partial last line left by a killed writer (the record in flight); return the good records."""
    with open(path, "rb") as f:
        data = f.read()
    good_end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:good_end].split(b"\n"), 1):
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


def start_stage(out, settings, redo, rank, world):
    """Begin (or resume) a stage writing `out`: the ids already done.

    The settings that decide the output (model and input fingerprints, sampling values) are kept beside it
    in `<out root>.settings.json`. Resuming output made with other settings would mix two experiments in
    one file, so it is refused, naming what changed; `redo` discards the old output instead. Every rank
    reads the same files and reaches the same decision; rank 0 alone deletes and writes."""
    if "dtype" in settings:  # what runs, not how it was asked for: `auto` is float32 on a CPU
        settings = dict(settings, dtype=str(parse_dtype(settings["dtype"], default_device())))
    settings = strict_json(settings)
    sfile = settings_path(out)
    done = done_records(out)
    if done and not redo:
        old = read_settings(sfile, out)
        diffs = [f"{k}: {old.get(k)} -> {settings.get(k)}" for k in sorted(set(old) | set(settings))
                 if old.get(k) != settings.get(k)]
        if diffs:
            raise SystemExit(f"{out}: was started with other settings ({'; '.join(diffs)}); re-run with --redo "
                             "to discard it and start again, or write to another --out")
    barrier(world)
    if rank == 0:
        if redo:
            for f in [out, sfile] + _shard_files(out):
                if os.path.exists(f):
                    os.remove(f)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_json(sfile, settings)
    barrier(world)
    return {str(r["id"]) for r in done_records(out)}


def read_settings(sfile, out):
    """The settings an existing output was made with. Without them nothing tells what made the output, so a
    missing or unreadable file is an error, not a silent resume."""
    what = f"{out}: holds records but its settings file {sfile}"
    try:
        with open(sfile, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"{what} is missing, so what made them is unknown; re-run with --redo to start the "
                         "stage again, or write to another --out") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{what} is unreadable ({e}); re-run with --redo to start the stage again") from None
    if not isinstance(old, dict):
        raise SystemExit(f"{what} is not a JSON object; re-run with --redo to start the stage again")
    return old


class ShardWriter:
    """Appends finished records to this rank's shard, flushed and fsynced one by one. The file is created at
    the first record, so a stage that fails before writing anything leaves nothing behind."""

    def __init__(self, out, rank):
        self.path, self.f = shard_path(out, rank), None

    def write(self, rec):
        if self.f is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self):
        if self.f is not None:
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


def finish_stage(out, order, rank, world):
    """Rank 0 merges the shards; then every rank waits, so that all of them read the merged file after."""
    barrier(world)
    merged = merge_shards(out, order) if rank == 0 else None
    barrier(world)
    return merged


def write_jsonl(path, records):
    """Write a whole file atomically (merged outputs and derived files such as pairs)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write0(path, recs):
    """Rank 0 writes a derived file in strict JSON (no NaN); every rank waits for it (the next step reads it on
    all of them)."""
    if int(os.environ.get("RANK", 0)) == 0:
        write_jsonl(path, strict_json(recs))
    barrier(int(os.environ.get("WORLD_SIZE", 1)))


def strict_json(obj):
    """`obj` with every NaN or infinity replaced by None (null), recursively, and anything else JSON cannot
    hold as its string: strict JSON readers reject NaN, and a number that is not one is better said as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy and torch scalars
        return strict_json(obj.item())
    return str(obj)


def write_json(path, obj, indent=2):
    """Write a JSON file atomically, in strict JSON (NaN and infinities become null; see strict_json)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict_json(obj), f, indent=indent, ensure_ascii=False, allow_nan=False)
    os.replace(tmp, path)


def file_digest(path, edges=None, n=16):
    """The first `n` hex digits of the sha256 of a file's bytes; with `edges`, of its size and its first and
    last `edges` bytes only (enough to tell weight files apart without reading gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if edges is None:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            size = os.fstat(f.fileno()).st_size
            h.update(str(size).encode() + f.read(edges))
            f.seek(max(0, size - edges))
            h.update(f.read())
    return h.hexdigest()[:n]


def model_fingerprint(path):
    """What identifies a checkpoint folder's weights: its config and the edges of every weight file."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") or name in ("config.json", "tokenizer.json"):
            h.update(name.encode() + file_digest(os.path.join(path, name), edges=1 << 20).encode())
    return h.hexdigest()[:16]


def lock_folder(folder):
    """Hold an exclusive lock on `folder` while this process lives (the kernel drops it when the process
    dies, even by SIGKILL). A folder another process holds is an error naming that process."""
    import fcntl
    import socket
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(f"{folder}: in use by process {holder}; wait for it to finish or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


# -----------------------------------------------------------------------------
# Distributed start-up


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
        # rank 0 alone does some steps (self-instruct, merges) while the others wait at a barrier: a long timeout
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
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


# -----------------------------------------------------------------------------
# Resumable training state


def open_metrics(path, step):
    """The metrics log holding exactly the steps up to `step`: a run killed after logging steps it had not
    saved logs them again when resumed, and a fresh run starts an empty log."""
    kept = []
    if step and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    f = open(path, "w")
    f.writelines(kept)
    f.flush()
    return f


def _local(t):
    """This rank's part of a tensor: the local shard of an FSDP2 (DTensor) tensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def save_state(state_dir, model, opt, step, world, rank, key):
    """Resumable state that holds no pickled object, so that reading it can run no code: each rank's shards of
    the weights and of AdamW's moments in step<N>/rank<r>.safetensors, and the rest (step, run key, world size)
    in trainer.json, written last; older steps are then deleted."""
    from safetensors.torch import save_file

    step_dir = os.path.join(state_dir, f"step{step}")
    tensors = {"rng": torch.get_rng_state()}
    for name, p in model.named_parameters():
        tensors[f"model/{name}"] = _local(p)
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim/{name}/{k}"] = _local(v)
    try:
        os.makedirs(step_dir, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(step_dir, f"rank{rank}.safetensors"))
        barrier(world)
        if rank == 0:
            write_json(os.path.join(state_dir, "trainer.json"), {"step": step, "run": key, "world": world})
            prune_steps(state_dir, keep=f"step{step}")
    except (OSError, SafetensorError) as e:
        raise SystemExit(f"{state_dir}: cannot save the training state ({getattr(e, 'strerror', None) or e})") from None
    barrier(world)


def read_trainer_json(state_dir):
    """trainer.json of a state folder, or None when there is none (or it was half written)."""
    try:
        with open(os.path.join(state_dir, "trainer.json")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_state(state_dir, model, opt, key, world, rank):
    """Restore the state written by `save_state` -> its step. Another run's state (other key) is refused; a
    state that is incomplete (a kill while it was being written or deleted) cannot be resumed: 0, start over."""
    from safetensors.torch import load_file

    meta = read_trainer_json(state_dir)
    if meta.get("run") != key:
        raise SystemExit(f"{state_dir}: written by another run (other output folder, model, data or settings); "
                         "--resume continues only the run that wrote it: start again without --resume")
    if meta.get("world") != world:
        raise SystemExit(f"{state_dir}: written by {meta.get('world')} rank(s), this run has {world}; resume with "
                         f"the same number of processes, or start again without --resume")
    f = os.path.join(state_dir, f"step{meta.get('step')}", f"rank{rank}.safetensors")
    try:
        saved = load_file(f)  # tensors only: safetensors runs no code
        names = [n for n, _ in model.named_parameters()]
        missing = [n for n in names if f"model/{n}" not in saved]
        if missing:
            raise ValueError(f"no weights for {missing[0]}")
    except (OSError, SafetensorError, ValueError) as e:
        print0(f"note: {state_dir} cannot be resumed ({e}); training starts again from step 0")
        return 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            _local(p).copy_(saved[f"model/{name}"])
            moments = {k.rsplit("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"optim/{name}/")}
            for k, v in moments.items():
                if v.ndim == 0:  # AdamW's step count: a plain scalar on the parameter's device
                    opt.state[p][k] = v.to(p.device)
                else:  # a moment shaped (and sharded) like its parameter
                    opt.state[p][k] = torch.zeros_like(p)
                    _local(opt.state[p][k]).copy_(v)
    torch.set_rng_state(saved["rng"])
    return meta["step"]


def prune_steps(state_dir, keep=None):
    """Delete the state's step<N> folders, all but `keep`."""
    for name in os.listdir(state_dir):
        if name.startswith("step") and name != keep:
            shutil.rmtree(os.path.join(state_dir, name), ignore_errors=True)


# -----------------------------------------------------------------------------
# Models


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_fetch(repo, repo_type="model", filename=None, what=None, hint=""):
    """A Hugging Face Hub repo's file (or, with no filename, a model snapshot: config, weights, tokenizer) from the
    user's cache or downloaded with their token; HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE and HF_HUB_CACHE / HF_HOME
    are read now (huggingface_hub reads them once, at import). Any failure is one line saying what to do."""
    what, hint = what or repo, hint and f"; {hint}"
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise SystemExit(f"{what}: fetching {repo} from the Hub needs huggingface_hub (`pip install huggingface_hub`){hint}")
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or (env.get("HF_HOME") and os.path.join(env["HF_HOME"], "hub")) or None
    offline = any(env.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    name = f"{repo}/{filename}" if filename else repo
    try:
        if filename:
            return hub.hf_hub_download(repo, filename, repo_type=repo_type, cache_dir=cache, local_files_only=offline)
        return hub.snapshot_download(repo, repo_type=repo_type, cache_dir=cache, local_files_only=offline,
                                     allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"])
    except (EntryNotFoundError, RepositoryNotFoundError, OSError) as e:  # named by the first class it is an instance of
        page = f"huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
        why = next(m for cls, m in (
            (LocalEntryNotFoundError, f"{name} is not in the Hub cache and the Hub cannot be reached (offline?)"),
            (GatedRepoError, f"{repo} is gated: accept its terms on {page} and log in (`hf auth login` or HF_TOKEN)"),
            (RepositoryNotFoundError, f"no {repo_type} repo {repo} on the Hub, nor a local folder of that name (or it "
                                      "is private and you are not logged in)"),
            (EntryNotFoundError, f"{repo} has no file {filename}"),
            (Exception, f"fetching {name} failed ({type(e).__name__}: {str(e)[:200]})")) if isinstance(e, cls))
        raise SystemExit(f"{what}: {why}{hint}") from None


def resolve_model(path, flag="--model"):
    """A local HF folder as given (it wins over a Hub id of the same name), a Hub id (`org/name`) as its snapshot
    in the Hugging Face cache, fetched on first use, or (None) the embedded default, converted on first use."""
    if path is None:
        from data.prepare_default import ensure_default_model
        return ensure_default_model()
    if os.path.exists(path) or not HUB_ID.fullmatch(path):
        return path
    return hub_fetch(path, what=f"{flag} {path}")


def check_model_dir(path, flag, chat_format=None):
    """A checkpoint folder that a stage will load later, checked now without reading its weights: its
    config, weight files and tokenizer. Hours into a run is too late to learn that a path has a typo."""
    from model import _weight_files, read_hf_config
    path = resolve_model(path, flag)
    try:
        read_hf_config(path)
        _weight_files(path)
        Tokenizer.from_pretrained(path, chat_format)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{flag}: {e}") from None


def load_model(path, device, dtype="auto", chat_format=None):
    """Model, tokenizer and folder of an HF checkpoint (`None`: the embedded default). A folder that cannot be
    run is a message naming it, not a traceback."""
    path = resolve_model(path)
    try:
        model = Transformer.from_pretrained(path, device=device, dtype=parse_dtype(dtype, device)).eval()
        tok = Tokenizer.from_pretrained(path, chat_format)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--model: {e}") from None
    if tok.vocab_size > model.args.vocab_size:
        raise SystemExit(f"--model: {path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                         f"(config.json vocab_size) has {model.args.vocab_size}; they do not belong together")
    return model, tok, path


def stable_seed(seed, rid) -> int:
    """A per-record seed from the run's seed and the record id (same on every rank and every re-run)."""
    h = 0
    for ch in f"{seed}:{rid}":
        h = (h * 131 + ord(ch)) % (1 << 61)
    return h


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device():
    """The device a process of this machine computes on: the GPU when there is one (see init_distributed)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str, device) -> torch.dtype:
    """--dtype: `auto` is bf16 on a GPU and fp32 on the CPU (bf16 matmuls are far slower than fp32 on CPUs
    without AVX-512)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype: unknown dtype {name!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]


# -----------------------------------------------------------------------------
# Flags


def check_flags(*rules):
    """Each rule is (flag, value, ok, what it must be); the first rule that fails is a message naming its flag.
    Scripts check their flags right after parsing, so a bad value fails before any model is loaded."""
    for flag, value, ok, need in rules:
        if not ok:
            raise SystemExit(f"{flag}: {value!r} is invalid (must be {need})")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def unescape(text):
    """Backslash escapes (\\n, \\t, \\\\, \\u00e9) decoded; other characters kept as they are."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def stop_argv(stops):
    """`--stop S` for each stop string, its backslashes doubled: the script decodes escapes (unescape)."""
    return [x for s in stops for x in ("--stop", s.replace("\\", "\\\\"))]


# -----------------------------------------------------------------------------
# Prompt templates and plugins


class Template(str):
    """A template's text, with the stop strings its `#stop:` lines give (see load_template)."""
    stops = ()


def load_template(path, required):
    """Read a prompt template; every `{name}` in `required` must appear in it. Lines at the top of the form
    `#stop: TEXT` are not part of it: each TEXT (after the one space, escapes such as \\n decoded, see unescape)
    is a stop string of generations prompted with it, in the returned Template's `stops`."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: template not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stops = []
    while text.startswith("#stop: "):
        line, _, text = text.partition("\n")
        stops.append(unescape(line[len("#stop: "):]))
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        raise SystemExit(f"{path}: template lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    if not all(stops):
        raise SystemExit(f"{path}: a `#stop:` line gives no text")
    template = Template(text)
    template.stops = tuple(stops)
    return template


def render(template, **fields):
    """Fill `{name}` placeholders in one pass: text put in is never scanned again, so a prompt that holds
    `{response}` keeps it as written (and user text may hold any braces, so no str.format)."""
    if not fields:
        return template.strip()
    names = re.compile("{(" + "|".join(re.escape(k) for k in fields) + ")}")
    return names.sub(lambda m: fields[m.group(1)], template).strip()


def load_function(spec, flag="--judge-fn"):
    """`module:function` -> the function (the module is imported from the Python path)."""
    import importlib
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"{flag}: cannot load {spec!r} ({e})") from None


def import_wandb():
    """wandb, imported only for --wandb (a run without the flag never loads it), or a one-line exit."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb: the wandb package is not installed (pip install wandb)") from None
    return wandb


def wandb_run(project, group=None, name=None, config=None):
    """A new Weights & Biases run. Several may be open at once in one process (iterate.py's iteration run beside
    a training stage's run)."""
    return import_wandb().init(project=project, group=group, name=name, config=config, reinit="create_new")
