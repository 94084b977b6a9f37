"""ChatGLM2/3 tokenization on sentencepiece: prompt ids, counting, and incremental decoding for streams.

The reference tokenizer is sentencepiece plus five special tokens appended after the pieces:
[MASK], [gMASK], [sMASK], sop, eop (ChatGLM3 adds its four role tokens after them: model/family.py). A prompt
is [gMASK], sop, then the chat: ChatGLM2's rounds as text, or ChatGLM3's messages after role tokens.
"""

from __future__ import annotations

from pathlib import Path

from .tool_prompt import split_turn

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
EOS_ID = 2
TRAINING_DATE_PLACEHOLDER = "[[训练时间]]"
TRAINING_DATE = "2023年"


def load_tokenizer(model_dir: str | Path, fallback_family: str = "chatglm2") -> ChatGLM2Tokenizer:
    """The tokenizer of a model folder (in the prompt format its files name; `fallback_family` when it has no
    such files), or a ValueError that says what to do."""
    from .family import detect_family

    path = Path(model_dir) / "tokenizer.model"
    try:
        return ChatGLM2Tokenizer(path, family=detect_family(model_dir, fallback_family))
    except (RuntimeError, OSError, ValueError) as exc:  # sentencepiece's parse errors are RuntimeErrors
        raise ValueError(f"{path} is not a sentencepiece model ({str(exc)[:80]}): download it again (delete it "
                         "and start)") from exc


# Questions unlike each other in their first character, to find where the chat template ends (conversation_start)
CONVERSATION_PROBES = ("你好", "hello", "1", "?", " ", "，")


class ChatGLM2Tokenizer:
    """ChatGLM2's tokenizer, or with family "chatglm3" ChatGLM3's (the same pieces, four role tokens more)."""

    def __init__(self, model_file: str | Path, family: str = "chatglm2"):
        import sentencepiece  # here, not at import: the HTTP layer imports this module before any model

        from .family import CHATGLM3, CHATGLM3_ROLES

        # From bytes, not from the path: sentencepiece's Windows build opens files with narrow (ANSI code page)
        # paths, so a folder such as C:\Users\张三\ is "not found" there. Python opens any path.
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=Path(model_file).read_bytes())
        self.n_pieces = self.sp.get_piece_size()
        if self.n_pieces == 0:  # sentencepiece accepts an empty file and fails only when used
            raise ValueError("the file is empty")
        self.family = family
        specials = SPECIAL_TOKENS + (CHATGLM3_ROLES if family == CHATGLM3 else ())
        self.special_ids = {name: self.n_pieces + i for i, name in enumerate(specials)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        self.eos_id = EOS_ID
        # ids that end a reply (never shown): eos, and for ChatGLM3 the next turn's role (user, observation)
        self.stop_ids = frozenset({EOS_ID} | {self.special_ids[r] for r in ("<|user|>", "<|observation|>")
                                             if r in self.special_ids})
        self.has_system_role = family == CHATGLM3
        # Anything at or above this id is a special token or padding: never shown, never sampled (except eos).
        self.first_special_id = self.n_pieces
        self.vocab_size = self.n_pieces + len(specials)  # ids a prompt may hold

    # -- prompts ---------------------------------------------------------------------------------------------
    def build_prompt(self, query: str, history: list[tuple[str, str]], answer_prefix: str = "",
                     system: str = "") -> list[int]:
        """The prompt's ids. ChatGLM2 has no system role: a system text leads the first question there."""
        if self.has_system_role:
            return self.prompt_prefix() + self.chatglm3_messages(query, history, answer_prefix, system)
        query, history = fold_system(system, query, history)
        return self.prompt_prefix() + self.sp.encode(chat_text(query, history, answer_prefix))

    def chatglm3_messages(self, query: str, history: list[tuple[str, str]], answer_prefix: str,
                          system: str) -> list[int]:
        """ChatGLM3's format: each message is its role token, the metadata line (empty: "\n") and its text;
        the prompt ends with <|assistant|> (then the answer prefix, after its metadata line)."""
        messages, prefill = chatglm3_messages(query, history, answer_prefix, system)
        ids = [i for role, metadata, text in messages for i in self.message(role, text, metadata)]
        ids.append(self.special_ids["<|assistant|>"])
        if prefill:
            ids += self.sp.encode("\n") + self.sp.encode(prefill)
        return ids

    def message(self, role: str, text: str, metadata: str = "") -> list[int]:
        return [self.special_ids[f"<|{role}|>"]] + self.sp.encode(f"{metadata}\n") + self.sp.encode(text)

    def prompt_prefix(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def conversation_start(self) -> list[int]:
        """The ids that every new conversation's prompt (no system text) begins with: the chat template's start,
        as far as it is the same whatever the question (its first words may merge with the template's last)."""
        prompts = [self.build_prompt(query, []) for query in CONVERSATION_PROBES]
        same = 0
        while all(len(ids) > same and ids[same] == prompts[0][same] for ids in prompts):
            same += 1
        return prompts[0][:same]

    def prompt_text(self, query: str, history: list[tuple[str, str]], answer_prefix: str = "",
                    system: str = "") -> str:
        """The prompt as text, special tokens spelled out: what an engine that takes no token ids is sent (its
        tokenizer, e.g. the export's tokenizer.json, turns it into build_prompt's ids)."""
        if self.has_system_role:
            messages, prefill = chatglm3_messages(query, history, answer_prefix, system)
            # (each text is encoded on its own, so it starts a new word: " " is its leading "▁")
            turns = "".join(f"<|{role}|>{metadata}\n" + (f" {text}" if text else "") for role, metadata, text in messages)
            return "[gMASK]sop" + turns + "<|assistant|>" + (f"\n {prefill}" if prefill else "")
        query, history = fold_system(system, query, history)
        return "[gMASK]sop" + chat_text(query, history, answer_prefix)

    # -- counting --------------------------------------------------------------------------------------------
    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    # -- decoding --------------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.first_special_id])

    def stream_decoder(self, continuation: bool = False) -> StreamDecoder:
        return StreamDecoder(self, continuation)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id adds to a text (b"" for special, control and padding ids): what logprobs report and
        what the grammar engine matches. A byte-fallback piece is its byte, "▁" a space."""
        sp = self.sp
        if not 0 <= token_id < self.n_pieces or sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        if sp.is_byte(token_id):
            return bytes([int(sp.id_to_piece(token_id)[3:5], 16)])
        return sp.id_to_piece(token_id).replace("\u2581", " ").encode("utf-8")

    def token_name(self, token_id: int) -> str:
        """One id as text for people: its text, or its name when it is special (</s>, [gMASK]) or an incomplete
        UTF-8 byte (bytes:\\xe4, as OpenAI spells those)."""
        raw = self.token_bytes(token_id)
        if not raw:
            return self.special_names.get(token_id) or (self.sp.id_to_piece(token_id) if token_id < self.n_pieces else
                                              f"<pad {token_id}>")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chatglm3_turns(query: str, history: list[tuple[str, str]], system: str) -> list[tuple[str, str]]:
    """ChatGLM3's turns as (role, text): the system text when there is one, the rounds, then the question."""
    turns = [("system", system)] if system else []
    for question, answer in history:
        turns += [("user", question), ("assistant", answer)]
    return [*turns, ("user", query)]


def chatglm3_messages(query: str, history: list[tuple[str, str]], answer_prefix: str,
                      system: str) -> tuple[list[tuple[str, str, str]], str]:
    """ChatGLM3's messages (role, metadata, text) and the prefill the reply continues. A turn's text may hold
    more messages (tool calls, observations: model/tool_prompt.py); so may the answer prefix, whose last message
    is the prefill when it is plain assistant text."""
    messages = [m for role, text in chatglm3_turns(query, history, system) for m in split_turn(role, text)]
    prefix = split_turn("assistant", answer_prefix) if answer_prefix else []
    if prefix and prefix[-1][:2] == ("assistant", ""):
        return messages + prefix[:-1], prefix[-1][2]
    return messages + prefix, ""


def fold_system(system: str, query: str, history: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """ChatGLM2 has no system role: the system text and a blank line lead the first question."""
    if not system:
        return query, history
    if history:
        return query, [(f"{system}\n\n{history[0][0]}", history[0][1]), *history[1:]]
    return f"{system}\n\n{query}", history


def round_text(number: int, question: str, answer: str) -> str:
    """One finished round of the ChatGLM2 chat template."""
    return f"[Round {number}]\n\n问：{question}\n\n答：{answer}\n\n"


def chat_text(query: str, history: list[tuple[str, str]], answer_prefix: str = "") -> str:
    """The ChatGLM2 chat template: numbered rounds of 问/答, the open round ending in the answer prefix."""
    rounds = [round_text(i, q, a) for i, (q, a) in enumerate(history, start=1)]
    rounds.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
    return "".join(rounds) + answer_prefix


def clean_reply(text: str) -> str:
    """What the reference shows of a reply: surrounding whitespace stripped, the training-date placeholder filled."""
    return text.strip().replace(TRAINING_DATE_PLACEHOLDER, TRAINING_DATE)


def clean_continuation(text: str, prefilled: bool) -> str:
    """The generated text as a continuation: like clean_reply, but after a prefill its leading space is kept
    ("The answer is" + " 42"), since the caller joins the two."""
    text = text.rstrip().replace(TRAINING_DATE_PLACEHOLDER, TRAINING_DATE)
    return text if prefilled else text.lstrip()


class StreamDecoder:
    """Turns generated ids into text one id at a time without re-decoding the whole reply.

    sentencepiece decides spaces and multi-byte characters from neighbouring pieces, so each step decodes only
    a short window: the ids since `prefix` (already shown, kept as context) against the same window plus the
    new ids. Text ending in U+FFFD is an incomplete UTF-8 sequence (byte-fallback pieces) and is held back.
    sentencepiece drops the space of a text's first piece ("▁Paris" -> "Paris"); a `continuation` (a raw
    completion, which goes on from its prompt: "is" + " Paris") keeps it.
    """

    def __init__(self, tokenizer: ChatGLM2Tokenizer, continuation: bool = False):
        self.tokenizer = tokenizer
        self.continuation = continuation
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this are already in the text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" while a character is still incomplete)."""
        if not 0 <= token_id < self.tokenizer.first_special_id:
            return ""
        self.ids.append(token_id)
        shown = self.tokenizer.sp.decode(self.ids[self.prefix:self.read])
        full = self.tokenizer.sp.decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) <= len(shown):
            return ""
        new = self.leading_space() + full[len(shown):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new

    def leading_space(self) -> str:
        """" " before a continuation's first text when its first piece starts with one (sentencepiece drops it)."""
        starts = self.continuation and self.read == 0 and self.ids
        return " " if starts and self.tokenizer.token_bytes(self.ids[0]).startswith(b" ") else ""

    def flush(self) -> str:
        """At the end of a reply: whatever is still held back (a truly broken byte sequence shows as U+FFFD)."""
        shown = self.tokenizer.sp.decode(self.ids[self.prefix:self.read])
        full = self.tokenizer.sp.decode(self.ids[self.prefix:])
        new = self.leading_space() + full[len(shown):] if len(full) > len(shown) else ""
        self.prefix = self.read = len(self.ids)
        self.text += new
        return new
