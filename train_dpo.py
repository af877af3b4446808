"""
DPO training on preference pairs (`prompt`, `chosen`, `rejected` JSON lines) with FSDP2 under torchrun;
writes the next model as an HF folder.

    python train_dpo.py --pairs runs/x/iter1/actor_pairs.jsonl --out runs/x/iter1/model --epochs 1
    python train_dpo.py --model DIR --pairs actor_pairs.jsonl judge_pairs.jsonl --out DIR2 --beta 0.1 --lr 5e-7
    torchrun --nproc_per_node 8 train_dpo.py --model DIR --pairs p.jsonl --out DIR2 --batch-size 64
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 train_dpo.py ...   # several nodes

Reference log-probs are computed once before training (by the starting model unless --ref names another)
and cached in `<out>.train/`, so training holds one model; --ref-mode online keeps a frozen reference.
State for --resume (model, optimizer, step) is saved there as tensors and JSON (common.save_state).
"""
import argparse
import hashlib
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from model import Transformer, attention, read_hf_config, read_hf_state, rope_inv_freq, save_hf
from safetensors import SafetensorError

from common import (barrier, check_flags, file_digest, finite, import_wandb, init_distributed, load_state, model_fingerprint,
                    open_metrics, print0, prune_steps, read_jsonl, read_trainer_json, resolve_model, save_state, wandb_run,
                    write_json)
from tokenizer import CHAT_FORMATS, Tokenizer

# -----------------------------------------------------------------------------
# The loss


def sequence_logps(model, tokens, loss_mask):
    """Sum of log p(token | prefix) over the response tokens. tokens (B, T); loss_mask (B, T) is 1 on
    response tokens (prompt and padding 0). Returns (logps (B,), response token counts (B,))."""
    mask = loss_mask[:, 1:]
    # position t predicts token t+1; masked targets (-1) give log-prob 0 inside the model
    targets = tokens[:, 1:].masked_fill(mask == 0, -1)
    logps = model(tokens[:, :-1], targets=targets)  # (B, T-1)
    return logps.sum(-1), mask.sum(-1)


class SharedPromptView:
    """Attention of packed pair rows (collate_pairs): the prompt and the chosen response from the start of the
    row, the prompt's last token again and the rejected response at its end, padding between. A token sees the
    earlier tokens of the prompt and of its own branch (the chosen side, with the prompt's last token; or the
    rejected side, with its copy), at the positions the rows give, so each response is computed exactly as
    after its own copy of the prompt while the prompt is computed once. No cache is kept.

    Two attention calls instead of one masked over the whole row: plain causal attention over the first
    `chosen_end` positions (right for every prompt and chosen token: all they may see lies before them), and the
    rejected ends, from `rejected_start` on, against the first `prompt_end` keys and their own under a mask.
    The rows' other positions (padding) get zeros. Together they score about half the query-key pairs a full
    masked square would."""

    def __init__(self, positions, branch, chosen_end, rejected_start, prompt_end):
        self.positions = positions  # (B, T)
        self.chosen_end, self.rejected_start, self.prompt_end = chosen_end, rejected_start, prompt_end
        tail = branch[:, rejected_start:]  # (B, Tb): the rejected ends, as queries and as keys
        Tb = tail.size(1)
        self.rejected = (tail == 2)[:, :, None]  # (B, Tb, 1)
        causal = torch.ones(Tb, Tb, dtype=torch.bool, device=branch.device).tril()
        # a rejected token sees the prompt (without its last token: the copy of that is its own branch's first)
        # and the earlier tokens of its own branch
        vis = torch.cat([(branch[:, None, :prompt_end] == 0).expand(-1, Tb, -1), causal & self.rejected.mT], -1)
        # any other query (padding, or the chosen tail of a longer row) sees the first key only: its output is
        # thrown away, but a query with nothing to see would give NaN
        first = torch.zeros_like(vis[:1, :1])
        first[..., 0] = True
        self.mask = torch.where(self.rejected, vis, first)[:, None]  # (B, 1, Tb, Tp + Tb)

    def attend(self, layer, q, k, v, backend):
        B, T = q.shape[:2]
        a, b, p = self.chosen_end, self.rejected_start, self.prompt_end
        ya = attention(q[:, :a], k[:, :a], v[:, :a], backend=backend)
        y = torch.cat([ya, ya.new_zeros(B, T - a, *ya.shape[2:])], 1) if a < T else ya
        if b >= T:
            return y
        kb, vb = (torch.cat([x[:, :p], x[:, b:]], 1) for x in (k, v))
        yb = attention(q[:, b:], kb, vb, mask=self.mask, backend="sdpa")
        return torch.cat([y[:, :b], torch.where(self.rejected[..., None], yb, y[:, b:])], 1)


def collate_pairs(examples, idx, device):
    """One row per pair (prompt and chosen response from the start, the prompt's last token again and the rejected
    response at the end; see SharedPromptView), padded between -> the model's inputs (B, T-1), targets (B, T-1)
    (-1 where nothing is predicted), the view, and masks (B, T-1) of the targets that belong to the chosen and to
    the rejected response."""
    # each row's start and end: (tokens, positions, branch, side) of prompt + chosen, and of the copy + rejected
    heads, tails, prompt_lens = [], [], []
    for i in idx:
        p, (c, r) = examples[i]["prompt"], examples[i]["responses"]
        P, C, R = len(p), len(c), len(r)
        # side: the response each token is part of; the last prompt token again starts the rejected branch (its
        # logits predict the rejected side's first token)
        heads.append((p + c, list(range(P + C)), [0] * (P - 1) + [1] * (1 + C), [0] * P + [1] * C))
        tails.append((p[-1:] + r, list(range(P - 1, P + R)), [2] * (1 + R), [0] + [2] * R))
        prompt_lens.append(P)
    T = max(len(h[0]) + len(t[0]) for h, t in zip(heads, tails))
    tokens, positions, side = (torch.zeros(len(heads), T, dtype=torch.long) for _ in range(3))
    branch = torch.full((len(heads), T), 3, dtype=torch.long)  # padding: a branch of its own, seen by no one else
    for n, (head, tail) in enumerate(zip(heads, tails)):
        for x, a, b in zip((tokens, positions, branch, side), head, tail):
            x[n, :len(a)], x[n, T - len(b):] = torch.tensor(a), torch.tensor(b)
    tokens, positions, branch, side = (x.to(device) for x in (tokens, positions, branch, side))
    target_side = side[:, 1:]  # input position i predicts token i + 1
    view = SharedPromptView(positions[:, :-1], branch[:, :-1], chosen_end=max(len(h[0]) for h in heads),
                            rejected_start=T - max(len(t[0]) for t in tails), prompt_end=max(prompt_lens) - 1)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:].masked_fill(target_side == 0, -1), "view": view,
            "chosen": (target_side == 1).float(), "rejected": (target_side == 2).float()}


def pair_logps(model, batch):
    """Summed log-probs of each pair's chosen and rejected response and their token counts, each (B,), from one
    packed forward (collate_pairs)."""
    logps = model(batch["tokens"], targets=batch["targets"], cache=batch["view"])  # (B, T-1)
    return ((logps * batch["chosen"]).sum(-1), (logps * batch["rejected"]).sum(-1),
            batch["chosen"].sum(-1), batch["rejected"].sum(-1))


LOSSES = ("sigmoid", "ipo", "hinge")


def preference_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, weight=None, loss="sigmoid",
                    beta=0.1, label_smoothing=0.0, nll_coef=0.0):
    """Per-pair loss of every variant, and the implicit rewards beta * (log pi - log ref) of both sides.

    chosen, rejected (B,): summed log-probs of the responses under the policy; ref_*: under the reference;
    n_* (B,): their token counts. With the log-ratio margin h = (chosen - ref_chosen) - (rejected - ref_rejected):
      sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO; eps = label_smoothing: cDPO)
      ipo      (h' - 1 / (2 beta))^2, h' the same margin of per-token log-probs (IPO defines it per token)
      hinge    max(0, 1 - beta h)                                              (SLiC)
    nll_coef adds nll_coef * (-chosen / n_chosen), the length-normalised NLL of the chosen response (DPO+NLL,
    as IRPO trains), and `weight` scales each pair's whole loss (ScPO's vote margin).
    """
    if loss == "ipo":
        h = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        if loss == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss == "hinge":
            losses = torch.relu(1 - beta * h)
        else:
            raise ValueError(f"unknown loss {loss!r}")
    if nll_coef:
        losses = losses + nll_coef * (-chosen / n_chosen.clamp(min=1))
    if weight is not None:
        losses = losses * weight
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def lr_at(step, total, warmup, lr, schedule, min_ratio=0.0):
    """Linear warmup over `warmup` steps, then cosine or linear decay to min_ratio * lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (min_ratio + (1 - min_ratio) * decay)


# -----------------------------------------------------------------------------
# Data


def check_pair(rec):
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(rec[key], str):
            return f"`{key}` must be a string"
    if rec["chosen"] == rec["rejected"]:
        return "`chosen` and `rejected` are the same text (the pair teaches nothing; drop it)"
    return check_common(rec)


def check_sft(rec):
    """An SFT record: `messages` (the last an assistant turn, the target), or `prompt` with `completion`
    (or with `chosen`, so a pair file's winners can be trained on)."""
    if "messages" in rec:
        ms = rec["messages"]
        if not isinstance(ms, list) or not ms or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                         and isinstance(m.get("content"), str) for m in ms):
            return "`messages` must be a non-empty list of {role: system|user|assistant, content: string}"
        if ms[-1]["role"] != "assistant":
            return "the last of `messages` must be the assistant turn to train on"
        return None
    key = "completion" if "completion" in rec else "chosen" if "chosen" in rec else None
    if key is None or not isinstance(rec.get("prompt"), str) or not isinstance(rec[key], str):
        return "needs `messages`, or a string `prompt` with a string `completion` (or `chosen`)"
    return check_common(rec)


def check_common(rec):
    if rec.get("system") is not None and not isinstance(rec["system"], str):
        return "`system` must be a string"
    w = rec.get("weight", 1.0)
    if isinstance(w, bool) or not finite(w) or w < 0:
        return "`weight` must be a finite non-negative number"
    return None


def encode_example(rec, tok, objective):
    """A record -> (prompt ids, [response ids]): DPO's chosen and rejected, or SFT's one target. A response that
    stopped at its token limit (`<side>_truncated: true`) gets no end-of-turn token: it never ended."""
    def response(text, truncated):
        return tok.encode(text) + ([] if truncated else [tok.eot_id])
    if objective == "dpo":
        return tok.encode_prompt(rec["prompt"], rec.get("system")), [
            response(rec["chosen"], rec.get("chosen_truncated")), response(rec["rejected"], rec.get("rejected_truncated"))]
    if "messages" in rec:  # earlier turns are context, only the last (assistant) turn is trained
        return tok.encode_chat(rec["messages"][:-1]), [response(rec["messages"][-1]["content"], rec.get("truncated"))]
    key = "completion" if "completion" in rec else "chosen"
    return tok.encode_prompt(rec["prompt"], rec.get("system")), [response(rec[key], rec.get(f"{key}_truncated"))]


def load_examples(files, tok, max_len, truncate, objective="dpo"):
    """Tokenized examples from JSONL files: preference pairs (dpo) or targets (sft); returns (examples, counts)."""
    examples, counts = [], {"truncated": 0, "skipped_too_long": 0}
    for fi, path in enumerate(files):
        if objective == "dpo":
            recs = read_jsonl(path, required=("prompt", "chosen", "rejected"), what="pair", check=check_pair)
        else:
            recs = read_jsonl(path, required=(), what="SFT record", check=check_sft)
        for i, rec in enumerate(recs):
            prompt, responses = encode_example(rec, tok, objective)
            longest = max(map(len, responses))
            if len(prompt) + longest > max_len:
                if truncate == "skip" or longest > max_len // 2:
                    counts["skipped_too_long"] += 1
                    continue
                prompt = prompt[len(prompt) + longest - max_len:]  # keep the end of the prompt
                counts["truncated"] += 1
            examples.append({"key": f"{fi}:{recs.lines[i]}", "prompt": prompt, "responses": responses,
                             "weight": float(rec.get("weight", 1.0))})
    return examples, counts


def make_batches(n, batch_size, seed, epoch):
    """The global batches of one epoch: a fresh random permutation of all n examples, cut in order. Every
    batch is a random mixture of the files (actor and judge pairs together), and the batches are the same
    for every world size, so runs on 1 and N ranks take the same steps."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def example_len(ex):
    """The padded width an example needs: its prompt and its longest response."""
    return len(ex["prompt"]) + max(map(len, ex["responses"]))


def collate(examples, idx, device):
    """Each example's prompt with each of its responses, response by response (DPO: every chosen row, then
    every rejected row; SFT: the target rows), right-padded: tokens (R, T), loss_mask (R, T), 1 on responses."""
    seqs = [(examples[i]["prompt"], examples[i]["responses"][j])
            for j in range(len(examples[idx[0]]["responses"])) for i in idx]
    T = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        tokens[b, :len(p) + len(r)] = torch.tensor(p + r)
        mask[b, len(p):len(p) + len(r)] = 1
    return tokens.to(device), mask.to(device)


def rank_slices(idx, world, micro, length=None):
    """Split a global batch over ranks (contiguous) and micro-batches; every rank gets the same number of
    micro-batches (a rank short of pairs repeats one with weight 0, so the collectives stay matched). With
    `length` (example -> tokens), each rank's share is ordered by length before it is cut, so a micro-batch
    holds examples of like length and pads little: a long judge prompt no longer pads short actor pairs. The
    step's gradient is the same sum whatever the order."""
    per = [idx[len(idx) * r // world: len(idx) * (r + 1) // world] for r in range(world)]
    if length is not None:
        per = [sorted(p, key=length) for p in per]
    steps = max(1, max(math.ceil(len(p) / micro) for p in per))
    out = []
    for p in per:
        mbs = [(p[k * micro:(k + 1) * micro], 1.0) for k in range(steps) if p[k * micro:(k + 1) * micro]]
        while len(mbs) < steps:
            mbs.append((idx[:1], 0.0))
        out.append(mbs)
    return out


# -----------------------------------------------------------------------------
# Model set-up


def build_model(path, device, world, mp_bf16, activation_checkpointing=False, compile=False):
    """The policy: fp32 master weights; under torchrun, FSDP2 per block then the root (torchtitan's order),
    rank 0 reading the checkpoint and broadcasting it into the shards. `compile` compiles each block (the
    identical blocks share one compiled graph), before sharding."""
    try:
        if world == 1:
            model = Transformer.from_pretrained(path, device=device, dtype=torch.float32)
        else:
            with torch.device("meta"):
                model = Transformer(read_hf_config(path))
        if compile:
            for block in model.layers:
                block.compile()
        if world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp_bf16 else MixedPrecisionPolicy()
            for block in model.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            model.to_empty(device=device)
            full = read_hf_state(path, model, dtype=torch.float32) if int(os.environ.get("RANK", 0)) == 0 else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            model.inv_freq = rope_inv_freq(model.args).to(device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model: {e}") from None
    model.activation_checkpointing = activation_checkpointing
    return model


@torch.no_grad()
def compute_ref_logps(model, examples, micro, world, rank, device, autocast):
    """Reference log-probs of every example's chosen and rejected response, on all ranks: (N, 2)."""
    model.eval()
    out = torch.zeros(len(examples), 2, device=device)
    idx = list(range(len(examples)))
    idx.sort(key=lambda i: example_len(examples[i]))  # micro-batches of like length pad little
    for mbs in zip(*rank_slices(idx, world, micro)):  # step all ranks together (FSDP collectives)
        batch, w = mbs[rank]
        with autocast():
            chosen, rejected, _, _ = pair_logps(model, collate_pairs(examples, batch, device))
        if w > 0:
            out[batch, 0], out[batch, 1] = chosen.float(), rejected.float()
    if world > 1:
        torch.distributed.all_reduce(out)  # each example was computed by exactly one rank
        # FSDP2 keeps the root's parameters gathered after a forward without grad; training from that
        # state silently diverges from a single process, so put every module back to its shards
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
    model.train()
    return out.cpu()


def ref_cache_key(files, ref_path, examples, args):
    """Hash of the pairs, the reference weights and the tokenization settings."""
    ident = [model_fingerprint(ref_path), [file_digest(f) for f in files], args.max_len, args.truncate,
             len(examples), args.dtype] + ([args.chat_format] if args.chat_format else [])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# Training


def load_data(args):
    """--data tokenized -> (examples, counts); data that would train nothing is an error."""
    try:
        tok = Tokenizer.from_pretrained(args.model, args.chat_format)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model: {e}") from None
    examples, data_counts = load_examples(args.data, tok, args.max_len, args.truncate, args.objective)
    if not examples:
        raise SystemExit(f"--data: no usable examples in {', '.join(args.data)} ({data_counts})")
    if not any(e["weight"] > 0 for e in examples):  # every gradient would be zero: "trained" would be a lie
        raise SystemExit(f"--data: every record of {', '.join(args.data)} has weight 0; there is nothing to learn")
    return examples, data_counts


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms do not
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def optimizer_step(model, opt, lr, step, grad_clip, forward_backward):
    """One step at learning rate `lr`: `forward_backward()` fills the gradients and returns the metrics; the
    gradient is clipped, and a non-finite loss or norm stops the run before it reaches the weights -> (metrics,
    gradient norm)."""
    for g in opt.param_groups:
        g["lr"] = lr
    m = forward_backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    if not math.isfinite(m["loss"]) or not math.isfinite(grad_norm):
        raise SystemExit(f"step {step}: non-finite loss {m['loss']} or gradient norm {grad_norm}; "
                         "lower --lr or check the pairs")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return m, grad_norm


def train(args):
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    args.model = resolve_model(args.model)
    examples, data_counts = load_data(args)
    work = args.out.rstrip("/") + ".train"
    os.makedirs(work, exist_ok=True)
    key, state_dir = run_key(args), os.path.join(work, "state")
    meta = read_trainer_json(state_dir) if args.resume else None
    if meta and meta.get("finished") and meta.get("run") == key and os.path.isdir(args.out) \
            and model_fingerprint(args.out) == meta.get("model"):  # killed after the end, before anyone noted it
        print0(f"{args.out}: already trained by this run ({meta['step']} steps); nothing to do")
        return {"steps": meta["step"], "examples": len(examples), "already_trained": True, **data_counts}
    # bf16 compute with fp32 master weights on GPUs: autocast on one GPU, FSDP2's mixed precision on several
    bf16 = device.type == "cuda" and args.dtype in ("auto", "bfloat16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and world == 1 else \
        (lambda: torch.autocast("cpu", enabled=False))
    model = build_model(args.model, device, world, bf16, args.activation_checkpointing, args.compile)
    ref = reference(args, model, examples, work, world, rank, device, bf16, autocast) if args.objective == "dpo" else None
    opt = make_optimizer(model, args)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * total)
    step = 0
    if meta and not meta.get("finished"):
        step = load_state(state_dir, model, opt, key, world, rank)
        if step:
            print0(f"resumed at step {step} from {state_dir}")
    what = f"loss {args.loss} beta {args.beta} | ref {args.ref_mode}" if args.objective == "dpo" else "SFT (mean target NLL)"
    print0(f"{len(examples)} examples ({data_counts}) | {total} steps of {args.batch_size} | world {world} | {what}")
    stop = min(total, args.stop_after or total, args.stop_after_epochs * steps_per_epoch if args.stop_after_epochs else total)
    metrics_f = open_metrics(os.path.join(work, "metrics.jsonl"), step) if rank == 0 else None
    wb = wandb_run(args.wandb, args.wandb_group, args.wandb_name, dict(vars(args), world=world, start_step=step)) \
        if args.wandb and rank == 0 else None  # a copy of metrics.jsonl: this invocation's steps only
    model.train()
    step_fn = train_step if args.objective == "dpo" else sft_step
    t_last, tokens_seen = time.time(), 0
    batches = {}
    while step < stop:
        epoch = step // steps_per_epoch
        if epoch not in batches:  # an epoch's batches, drawn once (the same on every rank)
            batches = {epoch: make_batches(len(examples), args.batch_size, args.seed, epoch)}
        idx = batches[epoch][step - epoch * steps_per_epoch]
        lr = lr_at(step, total, warmup, args.lr, args.schedule, args.min_lr_ratio)
        m, grad_norm = optimizer_step(model, opt, lr, step, args.grad_clip,
                                      lambda: step_fn(model, ref, examples, idx, args, world, rank, device, autocast))
        step += 1
        tokens_seen += m.pop("tokens")
        m = {"step": step, "epoch": epoch, **m, "grad_norm": grad_norm, "lr": lr}
        if step % args.log_every == 0 or step == total:
            m["tokens_per_s"] = round(tokens_seen / max(time.time() - t_last, 1e-9), 1)
            t_last, tokens_seen = time.time(), 0
            print0(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
        if metrics_f:
            metrics_f.write(json.dumps(m) + "\n")
            metrics_f.flush()
        if wb:
            wb.log(m, step=step)
        if args.epoch_models and step % steps_per_epoch == 0:  # an HF folder of each epoch's model
            save_model(model, world, rank, f"{args.out.rstrip('/')}.epoch{step // steps_per_epoch}", args.model)
        if args.save_every and step % args.save_every == 0 or step == stop < total:
            save_state(state_dir, model, opt, step, world, rank, key)
    if wb:
        wb.finish()
    if step < total:
        print0(f"stopped after step {step}; state in {state_dir} (continue with --resume)")
        return {"steps": step, "stopped": True}
    finish_run(model, args, world, rank, step, key, state_dir, metrics_f)
    print0(f"train_dpo | {args.objective} | steps {step} | examples {len(examples)} | saved {args.out}")
    return {"steps": step, "examples": len(examples), **data_counts}


def finish_run(model, args, world, rank, step, key, state_dir, metrics_f):
    """Save the trained model. The model folder is the result; the state was for resuming. What stays of the
    state says it is done, and which model it made."""
    save_model(model, world, rank, args.out, args.model)
    if rank == 0:
        metrics_f.close()
        os.makedirs(state_dir, exist_ok=True)
        write_json(os.path.join(state_dir, "trainer.json"), {"finished": True, "step": step, "run": key,
                                                             "model": model_fingerprint(args.out)})
        prune_steps(state_dir)
    barrier(world)


def save_model(model, world, rank, out, tokenizer_dir):
    """The full weights as an HF folder (every rank takes part in gathering the shards; rank 0 writes)."""
    if world == 1:
        state = model.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        try:
            save_hf(state, model.args, out, tokenizer_dir=tokenizer_dir)
        except OSError as e:
            raise SystemExit(f"{out}: cannot write the trained model ({e.strerror or e})") from None
    barrier(world)


def reference(args, model, examples, work, world, rank, device, bf16, autocast):
    """ref(packed, batch) -> reference log-probs of the batch's chosen and rejected responses: looked up from
    log-probs computed once up front (cached in `work` by content), or from a frozen model in memory."""
    ref_path = args.ref or args.model
    if args.ref_mode == "online":
        ref_model = build_model(ref_path, device, world, bf16).eval().requires_grad_(False)

        def online(packed, batch):
            with torch.no_grad():
                chosen, rejected, _, _ = pair_logps(ref_model, packed)
            return chosen.float(), rejected.float()
        return online
    from safetensors.torch import load_file, save_file
    cache = os.path.join(work, f"ref_logps-{ref_cache_key(args.data, ref_path, examples, args)}.safetensors")
    if os.path.exists(cache):
        table = load_file(cache)["ref_logps"]
        print0(f"reference log-probs from {cache}")
    else:
        t0 = time.time()
        src = model if ref_path == args.model else build_model(ref_path, device, world, bf16)
        table = compute_ref_logps(src, examples, args.micro_batch_size, world, rank, device, autocast)
        if rank == 0:
            try:
                save_file({"ref_logps": table.contiguous()}, cache + ".tmp")
                os.replace(cache + ".tmp", cache)
            except (OSError, SafetensorError) as e:
                raise SystemExit(f"{cache}: cannot write the reference log-probs ({getattr(e, 'strerror', None) or e})") from None
        print0(f"reference log-probs of {len(examples)} pairs in {time.time() - t0:.1f}s -> {cache}")
    return lambda packed, batch: (table[batch, 0].to(device), table[batch, 1].to(device))


def sft_step(model, ref, examples, idx, args, world, rank, device, autocast):
    """Forward and backward of the global batch `idx` for SFT: the mean NLL over all its target tokens (each
    token counts once, however the batch is split over ranks and micro-batches) -> metrics."""
    total = sum(len(examples[i]["responses"][0]) for i in idx)  # known on the host: exact normalisation
    sums = torch.zeros(2, device=device)  # NLL, target tokens
    for batch, w in rank_slices(idx, world, args.micro_batch_size, lambda i: example_len(examples[i]))[rank]:
        tokens, mask = collate(examples, batch, device)
        with autocast():
            logps, lengths = sequence_logps(model, tokens, mask)
        weight = torch.tensor([examples[i]["weight"] for i in batch], device=device)
        nll = -(logps.float() * weight).sum()
        (nll * w * world / total).backward()  # FSDP averages gradients over ranks: undo it with `world`
        sums += w * torch.stack([nll.detach(), lengths.sum().float()])
    if world > 1:
        torch.distributed.all_reduce(sums)
    return {"loss": (sums[0] / total).item(), "tokens": int(sums[1].item())}


METRICS = ("loss", "reward_acc", "margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps", "tokens")


def train_step(model, ref, examples, idx, args, world, rank, device, autocast):
    """Forward and backward of the global batch `idx` (this rank's share, in micro-batches) -> its metrics,
    means over the batch's pairs (and its token count), the same on every rank."""
    sums = dict.fromkeys(METRICS, 0.0)
    for batch, w in rank_slices(idx, world, args.micro_batch_size, lambda i: example_len(examples[i]))[rank]:
        packed = collate_pairs(examples, batch, device)
        with autocast():
            pc, pr, n_c, n_r = pair_logps(model, packed)
            ref_c, ref_r = ref(packed, batch)
        pc, pr = pc.float(), pr.float()
        weight = torch.tensor([examples[i]["weight"] for i in batch], device=device)
        losses, rc, rr = preference_loss(pc, pr, ref_c, ref_r, n_c, n_r, weight, args.loss,
                                         args.beta, args.label_smoothing, args.nll_coef)
        # the step follows the mean over the global batch, and FSDP averages gradients over the ranks; w = 0
        # marks a dummy micro-batch that only keeps this rank's collectives in step with the others
        (losses.sum() * w * world / len(idx)).backward()
        with torch.no_grad():
            for k, v in (("loss", losses), ("reward_acc", (rc > rr).float()), ("margin", rc - rr),
                         ("chosen_reward", rc), ("rejected_reward", rr), ("chosen_logps", pc), ("rejected_logps", pr),
                         ("tokens", n_c + n_r)):
                sums[k] = sums[k] + w * v.sum()
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in METRICS])
    if world > 1:
        torch.distributed.all_reduce(vec)
    out = {k: (v / len(idx)).item() for k, v in zip(METRICS, vec)}
    out["tokens"] = int(vec[-1].item())
    return out


def run_key(args):
    """What makes a training run this one: the starting model and reference, the data (by content: a moved
    folder is the same run) and every setting that shapes the steps. Resumable state carries it, so --resume
    takes only its own state."""
    keep = ("objective", "loss", "beta", "label_smoothing", "nll_coef", "lr", "epochs", "batch_size", "warmup_steps",
            "warmup_ratio", "schedule", "min_lr_ratio", "weight_decay", "grad_clip", "max_len", "truncate", "seed")
    ident = {"model": model_fingerprint(args.model),
             "ref": model_fingerprint(args.ref) if args.ref else None,
             "data": [file_digest(f) for f in args.data], **{k: getattr(args, k) for k in keep},
             **({"chat_format": args.chat_format} if args.chat_format else {})}  # absent: keys of older runs stand
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def build_parser():
    parser = argparse.ArgumentParser(description="DPO (and IPO/hinge/cDPO/DPO+NLL) on preference pairs, or SFT.")
    # io
    parser.add_argument("--model", default=None, help="starting HF folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", "--pairs", dest="data", nargs="+", required=True,
                        help="JSONL files: prompt/chosen/rejected pairs (dpo); messages, prompt/completion or prompt/chosen records (sft)")
    parser.add_argument("--objective", default="dpo", choices=("dpo", "sft"),
                        help="dpo: preference pairs against a reference; sft: the mean NLL of the target tokens")
    parser.add_argument("--out", required=True, help="HF folder to write the trained model to")
    parser.add_argument("--chat-format", default=None, choices=CHAT_FORMATS,
                        help="override the detected chat format (plain: prompt text, then response text and eos)")
    # loss
    parser.add_argument("--loss", default="sigmoid", help="sigmoid (DPO), ipo or hinge")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label noise")
    parser.add_argument("--nll-coef", type=float, default=0.0, help="weight of the length-normalised NLL of chosen (DPO+NLL)")
    parser.add_argument("--ref", default=None, help="reference HF folder (default: the starting model)")
    parser.add_argument("--ref-mode", default="precomputed", choices=("precomputed", "online"), help="reference log-probs once up front, or a frozen model in memory")
    # optimisation
    parser.add_argument("--lr", type=float, default=5e-7, help="peak learning rate")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the pairs")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step (global)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="pairs per forward on each rank (gradient accumulation fills the rest)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (default: --warmup-ratio of the total)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup as a fraction of the steps")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"), help="decay after warmup")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="final learning rate as a fraction of the peak")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    parser.add_argument("--max-len", type=int, default=2048, help="longest prompt + response in tokens")
    parser.add_argument("--truncate", default="prompt", choices=("prompt", "skip"), help="over-long pairs: cut the prompt's start, or skip")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward to save memory")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (CPU too: fuses the elementwise work; the first steps pay the compile)")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 compute with fp32 master weights on GPU, fp32 on CPU; float32 forces fp32")
    parser.add_argument("--seed", type=int, default=0, help="data order seed")
    # checkpoints and logs
    parser.add_argument("--save-every", type=int, default=0, help="save resumable state every N steps (0 = only when stopping)")
    parser.add_argument("--resume", action="store_true", help="continue from the state in <out>.train/state")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (and save state) after this many steps")
    parser.add_argument("--stop-after-epochs", type=int, default=None, help="stop (and save state) at the end of this epoch")
    parser.add_argument("--epoch-models", action="store_true", help="also write each epoch's model as an HF folder <out>.epoch<e>")
    parser.add_argument("--log-every", type=int, default=1, help="print a line every N steps")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log each metrics.jsonl record to Weights & Biases (pip install wandb); each invocation "
                             "is a new W&B run holding only the steps it trains (a --resume'd run starts a second one)")
    parser.add_argument("--wandb-group", default=None, help="--wandb: the W&B group")
    parser.add_argument("--wandb-name", default=None, help="--wandb: the W&B run name")
    return parser


def parse_args(argv=None):
    a = build_parser().parse_args(argv)
    positive = lambda x: finite(x) and x > 0  # noqa: E731
    check_flags(("--loss", a.loss, a.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
                ("--beta", a.beta, positive(a.beta), "a positive number"),
                ("--lr", a.lr, positive(a.lr), "a positive number"),
                ("--label-smoothing", a.label_smoothing, finite(a.label_smoothing) and 0 <= a.label_smoothing < 0.5, "in [0, 0.5)"),
                ("--nll-coef", a.nll_coef, finite(a.nll_coef) and a.nll_coef >= 0, ">= 0"),
                ("--epochs", a.epochs, a.epochs >= 1, "at least 1"),
                ("--batch-size", a.batch_size, a.batch_size >= 1, "at least 1"),
                ("--micro-batch-size", a.micro_batch_size, a.micro_batch_size >= 1, "at least 1"),
                ("--max-len", a.max_len, a.max_len >= 2, "at least 2"),
                ("--warmup-steps", a.warmup_steps, a.warmup_steps is None or a.warmup_steps >= 0, ">= 0"),
                ("--warmup-ratio", a.warmup_ratio, finite(a.warmup_ratio) and 0 <= a.warmup_ratio <= 1, "in [0, 1]"),
                ("--min-lr-ratio", a.min_lr_ratio, finite(a.min_lr_ratio) and 0 <= a.min_lr_ratio <= 1, "in [0, 1]"),
                ("--weight-decay", a.weight_decay, finite(a.weight_decay) and a.weight_decay >= 0, ">= 0"),
                ("--grad-clip", a.grad_clip, positive(a.grad_clip), "a positive number"),
                ("--save-every", a.save_every, a.save_every >= 0, ">= 0"),
                ("--stop-after", a.stop_after, a.stop_after is None or a.stop_after >= 1, "at least 1"),
                ("--stop-after-epochs", a.stop_after_epochs, a.stop_after_epochs is None or a.stop_after_epochs >= 1, "at least 1"),
                ("--log-every", a.log_every, a.log_every >= 1, "at least 1"),
                ("--dtype", a.dtype, a.dtype in ("auto", "float32", "bfloat16"), "auto, float32 or bfloat16"))
    if a.wandb and int(os.environ.get("RANK", 0)) == 0:
        import_wandb()  # a missing package fails now (and in iterate.py's checks), not after the reference pass
    return a


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
