"""
The tokenizer of an HF checkpoint folder (`tokenizer.json`, read with the `tokenizers` library) and the chat
formats of the two model families this project runs: Llama-3 (`<|start_header_id|>` ... `<|eot_id|>`) and
ChatML (`<|im_start|>` ... `<|im_end|>`: SmolLM2, Qwen). The family is read off the folder's tokenizer
files; `chat_format=` names it explicitly. An unknown family is an error, never a guess. The `plain` format
(never detected, only named) is for base models prompted as completions: no markers, see `format_plain`.

    python tokenizer.py --model checkpoints/smollm2-135m-instruct --text "Hello there"
"""
import argparse
import json
import os

from tokenizers import Tokenizer as HFTokenizer

CHAT_FORMATS = ("llama3", "chatml", "plain")


def format_llama3(messages, add_generation_prompt=True):
    """Llama-3 chat as pieces (text, is_control): control pieces are the header and turn markers."""
    pieces = [("<|begin_of_text|>", True)]
    for m in messages:
        pieces += [("<|start_header_id|>", True), (m["role"], False), ("<|end_header_id|>", True),
                   ("\n\n" + m["content"].strip(), False), ("<|eot_id|>", True)]
    if add_generation_prompt:
        pieces += [("<|start_header_id|>", True), ("assistant", False), ("<|end_header_id|>", True), ("\n\n", False)]
    return pieces


def format_chatml(messages, add_generation_prompt=True):
    """ChatML chat as pieces (text, is_control): each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`."""
    pieces = []
    for m in messages:
        pieces += [("<|im_start|>", True), (f"{m['role']}\n{m['content']}", False), ("<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        pieces += [("<|im_start|>", True), ("assistant\n", False)]
    return pieces


def format_plain(messages, add_generation_prompt=True):
    """A completion prompt as pieces: the user text as it is, after the system text and a blank line if there is
    one. There are no turns, so a conversation is an error; the response is what the model writes next."""
    if [m["role"] for m in messages] not in (["user"], ["system", "user"]):
        raise ValueError("the plain format takes one user text (and an optional system text), not a conversation")
    return [("".join(m["content"] + "\n\n" * (m["role"] == "system") for m in messages), False)]


# end-of-turn markers of each family: generation stops at any of them (and at the folder's eos tokens)
STOP_STRINGS = {"llama3": ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"), "chatml": ("<|im_end|>", "<|endoftext|>"),
                "plain": ()}  # plain: the folder's eos tokens alone
FORMATTERS = {"llama3": format_llama3, "chatml": format_chatml, "plain": format_plain}


def detect_chat_format(path: str, vocab: dict) -> str | None:
    """Tell the family from the folder: the chat template's markers, else the special tokens present."""
    template = ""
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            template = json.load(f).get("chat_template") or ""
    jinja = os.path.join(path, "chat_template.jinja")
    if not template and os.path.exists(jinja):
        with open(jinja) as f:
            template = f.read()
    if isinstance(template, list):  # some folders keep several named templates
        template = " ".join(t.get("template", "") for t in template)
    for marker, family in (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml")):
        if marker in template:
            return family
    if not template:
        if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
            return "llama3"
        if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
            return "chatml"
    return None


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_format: str, eos_ids=(), path="<memory>"):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {chat_format!r} (choose from {', '.join(CHAT_FORMATS)})")
        self.tok, self.chat_format, self.path = tok, chat_format, path
        # text is always text: a `<|im_end|>` inside a prompt or a response is encoded as its characters, never
        # as the control token (else a response could close its turn and forge the judge's reply); control
        # tokens come only from the chat format, by id
        tok.encode_special_tokens = True
        vocab = tok.get_vocab()
        missing = [s for s in STOP_STRINGS[chat_format][:1] if s not in vocab]
        if missing:
            raise ValueError(f"{path}: chat format {chat_format!r} needs the special token {missing[0]!r}, "
                             "which this tokenizer lacks")
        stops = {vocab[s] for s in STOP_STRINGS[chat_format] if s in vocab} | set(eos_ids)
        if not stops:
            raise ValueError(f"{path}: the plain format ends a response with the eos token, but no eos_token_id "
                             "is set (generation_config.json or config.json)")
        self.stop_ids = sorted(stops)
        # ends an assistant turn in training data: the family's end-of-turn marker, or (plain) the first eos
        self.eot_id = vocab[STOP_STRINGS[chat_format][0]] if STOP_STRINGS[chat_format] else list(eos_ids)[0]
        self.vocab_size = tok.get_vocab_size()
        self.pad_id = self.stop_ids[0]

    @classmethod
    def from_pretrained(cls, path: str, chat_format: str | None = None) -> "Tokenizer":
        f = os.path.join(path, "tokenizer.json")
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: missing (the tokenizer is read from tokenizer.json)")
        tok = HFTokenizer.from_file(f)
        if chat_format is None:
            chat_format = detect_chat_format(path, tok.get_vocab())
            if chat_format is None:
                raise ValueError(f"{path}: cannot tell the chat format from the tokenizer files; "
                                 f"name it (--chat-format {'|'.join(CHAT_FORMATS)})")
        return cls(tok, chat_format, eos_ids=_eos_ids(path), path=path)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, literally: special-token markers in the text are encoded as ordinary characters."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.path}: token {token!r} is not in the vocabulary")
        return i

    def chat_pieces(self, messages, add_generation_prompt=True):
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role system/user/assistant and string content, got {m!r}")
        pieces = FORMATTERS[self.chat_format](messages, add_generation_prompt)
        if self.chat_format != "plain":
            return pieces
        # plain text starts as the tokenizer itself starts a text: with a BOS where it adds one (Llama), else bare
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return [(self.tok.id_to_token(i), True) for i in ids[:ids.index(self.encode("a")[0])]] + pieces

    def format_chat(self, messages, add_generation_prompt=True) -> str:
        """The chat as text (for reading; the ids come from `encode_chat`)."""
        return "".join(text for text, _ in self.chat_pieces(messages, add_generation_prompt))

    def encode_chat(self, messages, add_generation_prompt=True) -> list[int]:
        """A message list -> the ids the model sees, ending with the assistant header when asked. Control
        markers become their token ids; the messages' text is encoded literally."""
        ids = []
        for text, control in self.chat_pieces(messages, add_generation_prompt):
            ids += [self.token_id(text)] if control else self.encode(text)
        return ids

    def encode_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """One user turn (optional system turn) ready for generation."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages)


def _eos_ids(path):
    """eos ids named by generation_config.json / config.json (an int or a list), in that order."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.exists(f):
            with open(f) as fh:
                eos = json.load(fh).get("eos_token_id")
            ids += [i for i in (eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []) if i not in ids]
    return ids


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Encode text or a chat prompt with a checkpoint's tokenizer.")
    parser.add_argument("--model", required=True, help="HF checkpoint folder with tokenizer.json")
    parser.add_argument("--text", default="Hello, world!", help="text to encode as one user turn")
    parser.add_argument("--chat-format", default=None, choices=CHAT_FORMATS, help="override the detected family")
    cli = parser.parse_args()
    t = Tokenizer.from_pretrained(cli.model, cli.chat_format)
    ids = t.encode_prompt(cli.text)
    print(f"chat format: {t.chat_format} | stop ids: {t.stop_ids} | {len(ids)} tokens")
    print(ids)
    print(repr(t.decode(ids, skip_special_tokens=False)))
