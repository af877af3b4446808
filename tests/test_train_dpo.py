"""train_dpo.py: the losses against hand-worked values, sequence_logps against a naive sum, and training
behaviour: FSDP2 on 2 CPU ranks vs one process, gradient accumulation, exact resume, overfitting."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_checkpoint, tiny_model

import train_dpo
from train_dpo import collate_pairs, lr_at, pair_logps, preference_loss, sequence_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sig(x):
    return 1 / (1 + math.exp(-x))


def loss_of(*logps, lengths=(1, 1), weight=None, **kw):
    one = lambda x: torch.tensor([float(x)])  # noqa: E731
    return preference_loss(*map(one, logps), one(lengths[0]), one(lengths[1]),
                           None if weight is None else one(weight), **kw)


def test_preference_loss_closed_forms():
    # policy chosen -10, rejected -14, reference -11 and -12: h = (-10 + 11) - (-14 + 12) = 3
    lp = (-10, -14, -11, -12)
    loss, rc, rr = loss_of(*lp, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(sig(1.5)), rel=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-1.0)
    loss, _, _ = loss_of(*lp, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(-0.9 * math.log(sig(1.5)) - 0.1 * math.log(sig(-1.5)), rel=1e-6)
    loss, _, _ = loss_of(*lp, beta=0.5, loss="ipo")
    assert loss.item() == pytest.approx((3 - 1 / (2 * 0.5)) ** 2)  # one token each: (3 - 1)^2 = 4
    # IPO per token: chosen 4 tokens (+1 / 4), rejected 2 tokens (-2 / 2): h' = 0.25 + 1 = 1.25
    loss, _, _ = loss_of(*lp, lengths=(4, 2), beta=0.5, loss="ipo")
    assert loss.item() == pytest.approx((1.25 - 1) ** 2)
    loss, _, _ = loss_of(*lp, beta=0.5, loss="hinge")
    assert loss.item() == pytest.approx(0.0)  # 1 - 1.5 < 0
    loss, _, _ = loss_of(*lp, beta=0.1, loss="hinge")
    assert loss.item() == pytest.approx(0.7)  # 1 - 0.3
    # DPO+NLL: + coef * (10 / 5 tokens); the weight scales the whole pair
    loss, _, _ = loss_of(*lp, lengths=(5, 3), beta=0.5, nll_coef=0.5, weight=0.25)
    assert loss.item() == pytest.approx(0.25 * (-math.log(sig(1.5)) + 0.5 * 10 / 5), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_of(*lp, loss="kto")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradients_push_chosen_up_and_rejected_down(loss_type):
    c, r = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    n = torch.tensor([3.0])
    loss, _, _ = preference_loss(c, r, torch.tensor([-10.0]), torch.tensor([-12.0]), n, n, beta=0.1, loss=loss_type)
    loss.sum().backward()
    assert c.grad.item() < 0 < r.grad.item()  # descending the loss raises chosen, lowers rejected


def test_sequence_logps_counts_response_tokens_only():
    model = tiny_model(seed=21)
    g = torch.Generator().manual_seed(0)
    prompt, resp = torch.randint(0, 97, (6,), generator=g), torch.randint(0, 97, (5,), generator=g)
    seq = torch.cat([prompt, resp])
    tokens = torch.zeros(2, 14, dtype=torch.long)
    tokens[:, :11] = seq
    tokens[1, 11:] = 7  # trailing padding of another value must not matter
    mask = torch.zeros(2, 14, dtype=torch.long)
    mask[:, 6:11] = 1
    with torch.no_grad():
        lp, n = sequence_logps(model, tokens, mask)
        full = torch.log_softmax(model(seq[None])[0].double(), -1)
    naive = sum(full[t - 1, seq[t]].item() for t in range(6, 11))  # token t predicted at position t-1
    assert n.tolist() == [5, 5]
    assert lp[0].item() == pytest.approx(naive, abs=1e-4) and lp[1].item() == pytest.approx(naive, abs=1e-4)
    # a different prompt changes the response's log-prob (it is conditioned on), the prompt is not summed
    tokens2 = tokens.clone()
    tokens2[:, :6] = (tokens2[:, :6] + 1) % 97
    with torch.no_grad():
        lp2, _ = sequence_logps(model, tokens2, mask)
    assert abs(lp2[0].item() - naive) > 1e-3


def test_packed_pairs_equal_two_plain_forwards_in_float64():
    """A pair is one row (the prompt once, its last token copied before the rejected side): each response's
    log-probs and their gradients equal those of a plain forward of prompt + that response, in float64, for
    prompts and responses of different lengths padded together (a 1-token prompt and 1-token responses too)."""
    model = tiny_model(seed=22).double()
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    # the last two: a long chosen with a short rejected beside the reverse, so the chosen tail of one row lies in
    # the span where the other row's rejected side is attended (and a long prompt reaches into it too)
    shapes = ((7, 5, 3), (1, 1, 1), (4, 9, 6), (2, 12, 2), (12, 1, 1), (1, 1, 14))
    examples = [{"prompt": rand(p), "responses": [rand(c), rand(r)]} for p, c, r in shapes]
    packed = collate_pairs(examples, range(len(shapes)), "cpu")
    view = packed["view"]
    assert view.rejected_start < view.chosen_end and view.rejected_start < view.prompt_end  # the overlaps tested
    chosen, rejected, n_c, n_r = pair_logps(model, packed)
    (chosen.sum() + 2 * rejected.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = []
    for ex in examples:
        for k, resp in enumerate(ex["responses"]):
            seq = torch.tensor([ex["prompt"] + resp])
            lp = torch.log_softmax(model(seq)[0].double(), -1)
            p = len(ex["prompt"])
            total = sum(lp[t - 1, seq[0, t]] for t in range(p, p + len(resp)))  # token t predicted at t-1
            (total * (1 + k)).backward()
            want.append(total.item())
    assert torch.allclose(torch.stack([chosen, rejected], 1).flatten(), torch.tensor(want, dtype=chosen.dtype), atol=1e-6)
    assert n_c.tolist() == [5, 1, 9, 12, 1, 1] and n_r.tolist() == [3, 1, 6, 2, 1, 14]
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_lr_schedule():
    assert lr_at(0, 10, 2, 1.0, "cosine") == 0.5 and lr_at(1, 10, 2, 1.0, "cosine") == 1.0
    assert lr_at(2, 10, 2, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(6, 10, 2, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(6, 10, 2, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(10, 10, 2, 1.0, "linear", min_ratio=0.1) == pytest.approx(0.1)


def write_pairs(path, n=8, weight=False):
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"q{i}", "prompt": f"Reply briefly to message {i}.", "chosen": "Sure." * (1 + i % 2),
                   "rejected": "Well, let me think about that at some length first. " * (1 + i % 3)}
            if weight:
                rec["weight"] = 0.5 + i % 2
            f.write(json.dumps(rec) + "\n")
    return str(path)


def metrics(out):
    with open(out + ".train/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def write_sft(path, n=8):
    """The three SFT formats in one file: chat messages, prompt/completion, and a pair's prompt/chosen."""
    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0:
                rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count."},
                                    {"role": "assistant", "content": "One two three " * (1 + i % 2)}]}
            elif i % 3 == 1:
                rec = {"prompt": f"Say {i}.", "completion": f"{i} and nothing else."}
            else:
                rec = {"prompt": f"Pick {i}.", "chosen": "This one.", "rejected": "That one, at length."}
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    return make_tiny_checkpoint(d / "ckpt", seed=3), write_pairs(d / "pairs.jsonl"), d


def run(setup, name, *extra):
    ckpt, pairs, d = setup
    out = str(d / name)
    data = ["--pairs", pairs] if "--data" not in extra else []
    train_dpo.main(["--model", ckpt, *data, "--out", out, "--lr", "1e-3", "--epochs", "2",
                    "--batch-size", "4", "--micro-batch-size", "1", "--warmup-steps", "1", *extra])
    return out


def test_two_fsdp_ranks_match_one_process_and_resume(setup):
    """One torchrun launch with 2 CPU ranks (FSDP2, gloo): a full run, and a stopped-then-resumed run.
    Guards the loss scaling across ranks, the dummy micro-batches, the reshard after the reference pass,
    and the sharded checkpoint round trip."""
    ckpt, pairs, d = setup
    single = metrics(run(setup, "single"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sft = write_sft(d / "sft.jsonl")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "dist_train_driver.py"), ckpt, pairs, str(d), sft],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = metrics(str(d / "dist_full"))
    assert len(dist) == len(single) == 4
    for a, b in zip(single, dist):
        for k in ("loss", "reward_acc", "margin", "chosen_logps", "rejected_logps", "grad_norm"):
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (a["step"], k, a[k], b[k])
    resumed = metrics(str(d / "dist_resume"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(dist, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # the final models agree with the single-process one
    from model import Transformer
    w1 = Transformer.from_pretrained(str(d / "single")).state_dict()
    w2 = Transformer.from_pretrained(str(d / "dist_full")).state_dict()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    # SFT: the same steps on 2 ranks as on one
    one = metrics(run(setup, "sft_single", "--objective", "sft", "--data", sft))
    two = metrics(str(d / "dist_sft"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_gradient_accumulation_matches_larger_micro_batch(setup):
    a = metrics(run(setup, "accum", "--micro-batch-size", "1"))
    b = metrics(run(setup, "nobatch", "--micro-batch-size", "4"))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_resume_single_process_is_exact(setup):
    full = metrics(run(setup, "full1"))
    run(setup, "res1", "--stop-after", "3")
    resumed = metrics(run(setup, "res1", "--resume"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], abs=1e-7)


def test_online_reference_gives_same_losses(setup):
    a = metrics(run(setup, "pre"))
    b = metrics(run(setup, "online", "--ref-mode", "online"))
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)


def test_few_pairs_overfit(setup):
    m = metrics(run(setup, "overfit", "--lr", "1e-4", "--epochs", "8", "--schedule", "constant"))
    assert m[0]["reward_acc"] == 0 and m[0]["margin"] == 0  # policy == reference at the first step
    assert all(x["reward_acc"] == 1.0 for x in m[-4:])
    assert m[-1]["margin"] > 2 * m[1]["margin"] > 0 and m[-1]["loss"] < m[1]["loss"] < m[0]["loss"]


def test_variants_and_weights_run(setup, tmp_path):
    ckpt, _, d = setup
    wp = write_pairs(tmp_path / "w.jsonl", weight=True)
    for extra in (["--loss", "ipo"], ["--loss", "hinge"], ["--label-smoothing", "0.1"], ["--nll-coef", "1.0"]):
        out = str(tmp_path / "v")
        train_dpo.main(["--model", ckpt, "--pairs", wp, "--out", out, "--epochs", "1", "--batch-size", "4",
                        "--micro-batch-size", "2", *extra])
        assert all(math.isfinite(x["loss"]) for x in metrics(out))


def test_bad_input_and_nonfinite(setup, tmp_path):
    ckpt, pairs, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    base = ["--model", ckpt, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="bad.jsonl:1: missing field 'rejected'"):
        train_dpo.main(base + ["--pairs", str(bad)])
    bad.write_text("")
    with pytest.raises(SystemExit, match="bad.jsonl: empty file"):
        train_dpo.main(base + ["--pairs", str(bad)])
    with pytest.raises(SystemExit, match=r"--loss: 'kto' is invalid \(must be one of sigmoid, ipo, hinge\)"):
        train_dpo.main(base + ["--pairs", pairs, "--loss", "kto"])
    with pytest.raises(SystemExit, match="non-finite"):
        train_dpo.main(base + ["--pairs", pairs, "--lr", "1e30", "--schedule", "constant", "--warmup-steps", "0",
                               "--grad-clip", "1e30", "--epochs", "3"])


# -----------------------------------------------------------------------------
# SFT


def test_sft_loss_is_the_mean_nll_of_target_tokens(setup, tmp_path):
    """The first step's loss (weights untouched) equals a naive mean NLL over every target token of the
    batch, computed here by full forwards; and only the last assistant turn of a chat is a target."""
    ckpt, _, _ = setup
    from model import Transformer
    from tokenizer import Tokenizer
    sft = write_sft(tmp_path / "sft.jsonl", n=4)
    out = str(tmp_path / "m")
    train_dpo.main(["--model", ckpt, "--objective", "sft", "--data", sft, "--out", out, "--batch-size", "4",
                    "--micro-batch-size", "3", "--lr", "1e-4", "--warmup-steps", "0", "--schedule", "constant"])
    tok, model = Tokenizer.from_pretrained(ckpt), Transformer.from_pretrained(ckpt)
    recs = [json.loads(line) for line in open(sft)]
    nll, count = 0.0, 0
    for r in recs:
        if "messages" in r:
            prompt, target = tok.encode_chat(r["messages"][:-1]), r["messages"][-1]["content"]
        else:
            prompt, target = tok.encode_prompt(r["prompt"]), r.get("completion", r.get("chosen"))
        tgt = tok.encode(target) + [tok.eot_id]
        seq = torch.tensor(prompt + tgt)
        with torch.no_grad():
            lp = torch.log_softmax(model(seq[None])[0].double(), -1)
        nll -= sum(lp[len(prompt) + j - 1, t].item() for j, t in enumerate(tgt))
        count += len(tgt)
    first = metrics(out)[0]
    assert first["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_sft_overfits_a_few_targets(setup, tmp_path):
    ckpt, _, _ = setup
    sft = write_sft(tmp_path / "sft.jsonl", n=6)
    m = metrics(run(setup, "sft_overfit", "--objective", "sft", "--data", sft, "--lr", "3e-3", "--epochs", "12",
                    "--schedule", "constant"))
    assert m[-1]["loss"] < 0.25 * m[0]["loss"]


def test_truncated_responses_get_no_end_of_turn(setup, tmp_path):
    ckpt, _, _ = setup
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(ckpt)
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "x", "chosen": "done.", "rejected": "cut off mid", "rejected_truncated": True}) + "\n")
    ex, _ = train_dpo.load_examples([str(p)], tok, 512, "prompt")
    chosen, rejected = ex[0]["responses"]
    assert chosen[-1] == tok.eot_id and rejected == tok.encode("cut off mid")


def test_batches_are_random_mixtures():
    """Each epoch is a fresh permutation: no length sorting that would keep long judge pairs and short actor
    pairs apart. Here the first 50 examples are one kind and the last 50 another."""
    batches = train_dpo.make_batches(100, 10, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(100))
    mixed = sum(1 for b in batches if 0 < sum(i < 50 for i in b) < len(b))
    assert mixed >= 8  # all-one-kind batches of 10 from a random permutation are rare (p ~ 2e-3 each)
    assert train_dpo.make_batches(100, 10, seed=0, epoch=1) != batches
