"""The `plain` chat format (base models prompted as completions) and stop strings: encoding, training rows, the
engine's stop-string ends, template `#stop:` lines and the flags."""
import json

import pytest
from conftest import read, tiny_model, write_jsonl
from test_sample import greedy_reference, prompts
from test_tokenizer import LLAMA3_SPECIALS, make_folder

import sample
import train_dpo
from common import load_template, unescape
from sample import Request, complete, cut_at_stop
from tokenizer import Tokenizer

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 256, 257, 258 after the 256 byte tokens

# the byte-level test tokenizer's ids, worked out by hand: its vocabulary is the ByteLevel alphabet sorted, so the
# printable ASCII byte b is id b - 33, and byte b < 33 (as U+0100 + b, after the 188 other printable bytes) is 188 + b
H, LI, Q, COLON, A, S, SPACE, NL = 39, 72, 48, 25, 32, 50, 220, 198  # H, i, Q, :, A, S, space, newline


def plain_tok(tmp_path, eos=(258,), specials=CHATML):
    return Tokenizer.from_pretrained(make_folder(tmp_path, specials, eos=list(eos)), "plain")


@pytest.mark.parametrize("prompt, system, want", [
    ("Hi", None, [H, LI]),  # the text alone: no markers, no BOS (this tokenizer adds none)
    ("Q: Hi\nA:", None, [Q, COLON, SPACE, H, LI, NL, A, COLON]),
    ("Hi", "S", [S, NL, NL, H, LI]),  # the system text, a blank line, then the prompt
    ("Hi", "", [H, LI]),  # an empty system text is no system text
    ("<|im_end|>", None, [27, 91, 72, 76, 62, 68, 77, 67, 91, 29]),  # markers in text are characters, not 258
])
def test_plain_prompt_is_the_text(tmp_path, prompt, system, want):
    t = plain_tok(tmp_path)
    assert t.encode_prompt(prompt, system) == want
    assert t.stop_ids == [258] and t.eot_id == 258


def test_plain_adds_the_bos_its_tokenizer_adds(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, processors
    d = make_folder(tmp_path, LLAMA3_SPECIALS, eos=[257, 260])  # <|begin_of_text|> is 256, <|end_of_text|> 257
    hf = HFTokenizer.from_file(f"{d}/tokenizer.json")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 256)])
    hf.save(f"{d}/tokenizer.json")
    t = Tokenizer.from_pretrained(d, "plain")
    assert t.encode_prompt("Hi") == [256, H, LI] and t.format_chat([{"role": "user", "content": "Hi"}]) == "<|begin_of_text|>Hi"
    assert t.encode_prompt("Hi", "S") == [256, S, NL, NL, H, LI]
    assert t.stop_ids == [257, 260] and t.eot_id == 257  # the first eos the folder names ends a trained response


def test_plain_refuses_conversations_and_a_folder_without_eos(tmp_path):
    (tmp_path / "a").mkdir()
    t = plain_tok(tmp_path / "a")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(ValueError, match="not a conversation"):
        t.encode_chat(turns)
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="no eos_token_id"):
        Tokenizer.from_pretrained(make_folder(tmp_path / "b", CHATML), "plain")


def test_plain_training_rows_are_prompt_then_response_then_eos(tmp_path):
    t = plain_tok(tmp_path, eos=(256, 258))  # eot: 256, the first eos named
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q: Hi\nA:", "chosen": " Hi", "rejected": " i",
                                                    "rejected_truncated": True}])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "system": "S", "completion": "Q"}])
    (ex,), _ = train_dpo.load_examples([pairs], t, 512, "skip")
    tokens, mask = train_dpo.collate([ex], [0], "cpu")
    prompt = [Q, COLON, SPACE, H, LI, NL, A, COLON]
    assert tokens[0].tolist() == prompt + [SPACE, H, LI, 256]  # the chosen response ends with the eos
    assert tokens[1].tolist() == prompt + [SPACE, LI, 0, 0]  # cut at its length limit: no eos (then padding)
    assert mask[0].tolist() == [0] * 8 + [1] * 4 and mask[1].tolist() == [0] * 8 + [1] * 2 + [0] * 2
    (ex,), _ = train_dpo.load_examples([sft], t, 512, "skip", objective="sft")
    assert train_dpo.collate([ex], [0], "cpu")[0][0].tolist() == [S, NL, NL, H, LI, Q, 256]


@pytest.mark.parametrize("text, stops, want", [
    ("Four.\n\nQ: next", ("\n\nQ:",), "Four."),
    ("no stop here", ("\n\nQ:",), "no stop here"),
    ("x END y STOP", ("STOP", "END"), "x "),  # the earliest stop string, whatever its place in the list
    ("abab", ("ba", "ab"), ""),
    ("\n\nQ", ("\n\nQ:",), "\n\nQ"),  # a stop string not yet complete cuts nothing
    ("", ("a",), ""),
    ("text", (), "text"),
])
def test_cut_at_stop(text, stops, want):
    assert cut_at_stop(text, stops) == want


def angled(ids):
    """Token i reads as `<i>`: several characters a token, so a stop string can begin inside a token."""
    return "".join(f"<{i}>" for i in ids)


def test_a_stop_string_ends_its_row_cuts_its_text_and_frees_its_slot():
    model = tiny_model(seed=12)
    ps = prompts(1, [4, 9, 5, 12])
    refs = [greedy_reference(model, p, 10)[0] for p in ps]
    stop = f"{refs[0][3]}><{refs[0][4]}"  # begins inside token 3 of the first row's greedy output, ends in token 4
    full = angled(refs[0])
    end = next(k for k in range(len(refs[0]) + 1) if stop in angled(refs[0][:k]))  # the token that completes it
    reqs = [Request(ps[0], temperature=0.0, max_new_tokens=10, stop_strings=(stop,), decode=angled)]
    reqs += [Request(p, temperature=0.0, max_new_tokens=10, decode=angled) for p in ps[1:]]
    # two rows for four requests: the others get in only through the slot that the stopped row gives back
    out = complete(model, reqs, max_rows=2)
    c = out[0][0]
    assert c.finish_reason == "stop" and c.tokens == refs[0][:end] and c.text == full[:full.find(stop)]
    assert c.text.endswith("<")  # cut inside a token
    for ref, (c,) in zip(refs[1:], out[1:]):
        assert c.finish_reason == "length" and c.tokens == ref and c.text == angled(ref)
    with pytest.raises(ValueError, match="needs `decode`"):
        complete(model, [Request(ps[0], max_new_tokens=4, stop_strings=("x",))])


def test_a_stop_string_of_more_tokens_than_characters_is_found():
    """'éé' is two characters but four bytes: when each token is one byte, the matcher must look at more
    tokens than the stop string has characters."""
    model = tiny_model(seed=12)
    for p in prompts(3, [3, 5, 7, 9, 11, 13]):
        ref, _ = greedy_reference(model, p, 10)
        lead, cont = {ref[2], ref[4]}, {ref[3], ref[5]}
        if not lead & cont:
            break
    assert not lead & cont

    def as_bytes(ids):  # the tokens of `lead` are the byte C3, those of `cont` A9 ('é' is C3 A9), others 'x'
        return b"".join(b"\xc3" if i in lead else b"\xa9" if i in cont else b"x" for i in ids).decode("utf-8", "replace")
    end = next(k for k in range(len(ref) + 1) if "éé" in as_bytes(ref[:k]))
    (c,), = complete(model, [Request(p, temperature=0.0, max_new_tokens=10, stop_strings=("éé",), decode=as_bytes)])
    assert c.finish_reason == "stop" and c.tokens == ref[:end] and "é" not in c.text


@pytest.mark.parametrize("head, stops", [
    ("", ()),
    ("#stop: \\n\\nQ:\n", ("\n\nQ:",)),
    ("#stop: \\n\\nQ:\n#stop: END \n", ("\n\nQ:", "END ")),  # one a line; the text after `#stop: ` as written
])
def test_template_stop_lines(tmp_path, head, stops):
    body = "Q: {prompt}\nA: Let's think step by step.\n"
    (tmp_path / "t.txt").write_text(head + body + "#stop: not at the top\n")
    t = load_template(str(tmp_path / "t.txt"), ("prompt",))
    assert t == body + "#stop: not at the top\n" and t.stops == stops


@pytest.mark.parametrize("flag, want", [
    ("\\n\\nQ:", "\n\nQ:"), ("é\\t", "é\t"), ("a\\\\n", "a\\n"), ("plain", "plain")])
def test_unescape(flag, want):
    assert unescape(flag) == want


def test_flags_accept_plain_and_stop_strings(tmp_path):
    base = ["--prompts", "p.jsonl", "--out", "o.jsonl", "--chat-format", "plain"]
    args = sample.parse_args(base + ["--stop", "\\n\\nQ:", "--stop", "END"])
    assert args.chat_format == "plain" and args.stop == ["\n\nQ:", "END"]
    with pytest.raises(SystemExit):
        sample.parse_args(base + ["--stop", ""])
    assert train_dpo.build_parser().parse_args(["--data", "x", "--out", "y", "--chat-format", "plain"]).chat_format == "plain"


def test_sample_stage_cuts_responses_at_a_stop_string(tmp_path, tiny_ckpt):
    """The actor stage in the plain format: a rerun with a stop string taken from the first run's greedy answer
    writes that answer cut before it, finished by "stop"."""
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Q: hi\nA:"}])
    args = ["--model", tiny_ckpt, "--prompts", p, "--n-responses", "1", "--temperature", "0", "--max-new-tokens", "24",
            "--chat-format", "plain"]
    sample.main(args + ["--out", str(tmp_path / "a.jsonl")])
    first = read(tmp_path / "a.jsonl")[0]["responses"][0]
    assert len(first) >= 4, first
    stop = first[2:4]
    sample.main(args + ["--out", str(tmp_path / "b.jsonl"), "--stop", stop.replace("\\", "\\\\")])
    rec = read(tmp_path / "b.jsonl")[0]
    assert rec["responses"] == [first[:first.find(stop)]] and rec["finish_reasons"] == ["stop"]
    with open(tmp_path / "b.settings.json") as f:
        assert json.load(f)["stop"] == [stop]
