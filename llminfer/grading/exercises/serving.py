"""Chapter 11, serving: the two pieces of a streamed answer that are easy to get almost right. The client's
server-sent-event parser turns bytes cut anywhere back into the events the server wrote; the server's incremental
detokenizer turns a growing list of token ids into text deltas (never half a character, never the start of a stop
string the final text will not contain).

The references here are written out on their own, more simply than `llminfer.serve` does it (the detokenizer
decodes every prefix of the ids; the parser reads one character at a time), and the tests drive the detokenizer
as the engine does: stop strings are checked after every token, and the request ends at the first token that
completes one. While a test runs, `llminfer.serve.detokenizer` and `llminfer.serve.sse` are switched off: an
answer that calls them fails, with a message saying which function it called.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from functools import cache

from llminfer.grading.compare import Mismatch
from llminfer.grading.exercise import Exercise, ExerciseTest
from llminfer.grading import support
from llminfer.grading.remote import send_as_recipe

CHAPTER = "chapters/deployment/11_serving"
LIBRARY = ("llminfer.serve.detokenizer", "llminfer.serve.sse")   # switched off while a test runs
MODEL = support.SERVING_MODEL
REPLACEMENT = "\ufffd"   # what decoding yields for an incomplete (or invalid) UTF-8 sequence

PLAY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n")
HARD_TEXTS = ("Hello 😀 world 🇯🇵!", "日本語のテキスト、そして中文。", "שלום עולם — مرحبا بالعالم",
              "a\n\nb\n\n\nc", "é" * 7, "👩‍👩‍👧 family, 한국어, Ελληνικά")


def _tokenizer():
    """The shipped model's byte-level BPE tokenizer: one token can hold part of a character's bytes. It crosses to
    the answer's process by name, and is loaded there."""
    return send_as_recipe(support.tokenizer(MODEL), "tokenizer", MODEL)


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _around(text: str, i: int) -> str:
    return repr(("..." if i > 12 else "") + text[max(0, i - 12):i + 12])


# --- the incremental detokenizer: the reference -----------------------------------------------------------------

class ReferenceIncrementalDetokenizer:
    """Decodes every prefix of the ids; the text of the longest prefix whose text does not end in U+FFFD is
    complete. It sends what is complete, less the last len(longest stop) - 1 characters (and nothing before
    `min_tokens` tokens when there are stop strings)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.min_tokens = min_tokens if stop else 0
        self.seen = 0
        self.complete = ""   # the text of the longest prefix of the ids whose text does not end in U+FFFD
        self.sent = 0        # characters of `complete` sent

    def update(self, token_ids: Sequence[int]) -> str:
        for n in range(self.seen + 1, len(token_ids) + 1):
            text = self.tokenizer.decode(list(token_ids[:n]))
            if not text.endswith(REPLACEMENT):
                self.complete = text
        self.seen = max(self.seen, len(token_ids))
        if len(token_ids) < self.min_tokens:
            return ""
        safe = max(len(self.complete) - self.holdback, self.sent)
        delta, self.sent = self.complete[self.sent:safe], safe
        return delta

    def finish(self, final_text: str) -> str:
        sent = self.complete[:self.sent]
        return final_text[len(sent):] if final_text.startswith(sent) else ""


# --- the incremental detokenizer: the tests ---------------------------------------------------------------------

def _engine_end(tokenizer, ids: list[int], stop: Sequence[str], min_tokens: int) -> tuple[int, str]:
    """Where the engine ends the request and its final text: after each token from `min_tokens` on it looks for
    the stop strings in the whole output's text, and cuts before the first one to be complete."""
    for k in range(max(min_tokens, 1), len(ids) + 1) if stop else ():
        text = tokenizer.decode(ids[:k])
        hits = [(start + len(s), start) for s in stop if (start := text.find(s)) >= 0]
        if hits:
            return k, text[:min(hits)[1]]
    return len(ids), tokenizer.decode(ids)


def _expect_str(value: object, call: str) -> str:
    if not isinstance(value, str):
        raise Mismatch(f"{call} returned a {type(value).__name__}, expected a str (the new text)")
    return value


def _stream(answer_class, ids: list[int], chunks: Iterable[int], stop: Sequence[str] = (),
            min_tokens: int = 0) -> tuple[int, int]:
    """Feed the ids `chunks[i]` more at a time, as the engine would, to the answer and the reference; after every
    call the text sent must start the final text and be at least what the reference sent; then `finish` must
    complete it. Returns (calls, characters)."""
    tokenizer = _tokenizer()
    end_at, final = _engine_end(tokenizer, ids, stop, min_tokens)
    setting = (f" (stop={list(stop)}, min_tokens={min_tokens})" if stop
               else f" (min_tokens={min_tokens}, no stop strings)" if min_tokens else "")
    answer = answer_class(tokenizer, list(stop), min_tokens)
    reference = ReferenceIncrementalDetokenizer(tokenizer, stop, min_tokens)
    sent, safe, end, calls = "", "", 0, 0
    for size in chunks:
        end = min(end + size, len(ids))
        if end >= end_at:   # the engine finished the request at this token: no update, only finish
            break
        call = f"update(ids[:{end}])"
        sent += _expect_str(answer.update(list(ids[:end])), call)
        safe += reference.update(list(ids[:end]))
        calls += 1
        if not final.startswith(sent):
            i = _first_difference(sent, final)
            if i < len(sent) and sent[i] == REPLACEMENT:
                why = "; U+FFFD is half of a character: hold back text while it ends in U+FFFD"
            elif i == len(final) and stop:
                why = ("; the final text ends there, cut before a stop string: hold back what could begin one"
                       + (" (and before min_tokens tokens, everything)" if min_tokens else ""))
            else:
                why = ""
            raise Mismatch(f"after {call} your deltas add up to text the final text does not start with: at "
                           f"character {i} you sent {_around(sent, i)}, the final text is {_around(final, i)}"
                           f"{why}{setting}")
        if len(sent) < len(safe):
            raise Mismatch(f"after {call} you had sent {len(sent)} characters, but {len(safe)} were safe to send: "
                           f"{safe[len(sent):len(sent) + 16]!r} is complete text that no stop string can still cut"
                           f"{setting}")
    sent += _expect_str(answer.finish(final), "finish(final_text)")
    if sent != final:
        i = _first_difference(sent, final)
        why = ("; finish must send the rest of final_text, a U+FFFD at its end too"
               if final.endswith(REPLACEMENT) and not sent.endswith(REPLACEMENT) else "")
        raise Mismatch(f"your deltas add up to {len(sent)} characters, the final text has {len(final)}; at character "
                       f"{i} you have {_around(sent, i)}, the final text {_around(final, i)}{why}{setting}")
    return calls, len(final)


def _encode(text: str) -> list[int]:
    return _tokenizer().encode(text, add_special_tokens=False)


def _texts_one_token_at_a_time(texts: Sequence[str], stop: Sequence[str] = (), min_tokens: int = 0):
    def run(answer_class) -> str:
        characters = 0
        for text in texts:
            ids = _encode(text)
            characters += _stream(answer_class, ids, [1] * len(ids), stop, min_tokens)[1]
        return f"{len(texts)} text(s), {characters} characters, exact"

    return run


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    """Chunk sizes 0 to 4 (0: a call with no new ids) covering n ids."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.choice((0, 1, 1, 1, 2, 3, 4)))
    return sizes


def _chunked(seed: int):
    def run(answer_class) -> str:
        rng = random.Random(seed)
        calls = 0
        for text in (PLAY, *HARD_TEXTS):
            ids = _encode(text)
            calls += _stream(answer_class, ids, _random_chunks(rng, len(ids)))[0]
        return f"{1 + len(HARD_TEXTS)} texts, {calls} calls, exact"

    return run


def _cut_mid_character(answer_class) -> str:
    """The request runs out of tokens inside an emoji: the final text ends in U+FFFD, and finish sends it."""
    cases = 0
    for text in ("Hello 😀", "日本", "שלום 🇯🇵"):
        ids = _encode(text)
        for cut in range(1, len(ids)):
            _stream(answer_class, ids[:cut], [1] * cut)
            cases += 1
    return f"{cases} cuts, exact"


def _random_ids(seed: int, cases: int, stops: bool):
    """Any token ids (bytes that never complete a character, in the middle too) and texts, random chunks, and with
    `stops` random stop strings (some cut from the text itself, so that they straddle tokens) and min_tokens."""
    def run(answer_class) -> str:
        rng, tokenizer = random.Random(seed), _tokenizer()
        stopped = 0
        for _ in range(cases):
            if rng.random() < 0.5:
                ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
            else:
                text = "".join(rng.choice((PLAY[rng.randrange(60):][:30], *HARD_TEXTS)) for _ in range(3))
                ids = _encode(text)[:rng.randint(1, 60)]
            stop, min_tokens = (), 0
            if stops:
                text = tokenizer.decode(ids)
                stop = rng.sample(["\n\n", "the", "😀", "e", ", and", "本", " ", "ال"], rng.randint(0, 2))
                if rng.random() < 0.6 and len(text) > 2:
                    start = rng.randrange(len(text) - 1)
                    piece = text[start:start + rng.randint(1, 6)]
                    if REPLACEMENT not in piece:
                        stop.append(piece)
                rng.shuffle(stop)
                min_tokens = rng.choice((0, 0, 1, 3, 8))
            stopped += _engine_end(tokenizer, ids, stop, min_tokens)[1] != tokenizer.decode(ids)
            _stream(answer_class, ids, _random_chunks(rng, len(ids)), stop, min_tokens)
        return f"{cases} streams" + (f", {stopped} ended by a stop string" if stops else "") + ", exact"

    return run


DETOKENIZER_TESTS = (
    ExerciseTest("the play's text, one token at a time", 2, _texts_one_token_at_a_time([PLAY])),
    ExerciseTest("emoji, CJK and right-to-left text: a character split across tokens is sent whole", 2,
                 _texts_one_token_at_a_time(HARD_TEXTS)),
    ExerciseTest("chunks of 0 to 4 new tokens per call", 1, _chunked(seed=1)),
    ExerciseTest("a stop string split across tokens is never sent", 2,
                 _texts_one_token_at_a_time([PLAY, *HARD_TEXTS], stop=["\n\n"])),
    ExerciseTest("stop strings of different lengths: the longest sets the holdback", 1,
                 _texts_one_token_at_a_time([PLAY, "Speak, speak 😀 日本語 the end", "hear me speak first"],
                                            stop=["zz", "hear me speak", "😀 日本"])),
    ExerciseTest("min_tokens: before it, stop strings do not count yet, so nothing is sent", 1,
                 _texts_one_token_at_a_time(["a, b, c, d, e, f", PLAY], stop=[","], min_tokens=4)),
    ExerciseTest("min_tokens without stop strings changes nothing", 1,
                 _texts_one_token_at_a_time([PLAY, HARD_TEXTS[0]], min_tokens=12)),
    ExerciseTest("the request ends inside a character: finish sends its U+FFFD", 1, _cut_mid_character),
    ExerciseTest("random token ids, random chunks", 2, _random_ids(seed=2, cases=60, stops=False)),
    ExerciseTest("random ids and texts, stop strings, min_tokens", 2, _random_ids(seed=3, cases=120, stops=True),
                 visible=False),
)


# --- the SSE parser: the reference --------------------------------------------------------------------------------

def reference_parse_sse(chunks: Iterable[bytes]) -> Iterator[str]:
    """One character at a time: lines end at \\r\\n, \\r or \\n; a blank line dispatches the event if it has data."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    line: list[str] = []
    data: list[str] | None = None   # None: no data field in this event yet
    after_cr = False
    for chunk in chunks:
        for char in decoder.decode(chunk):
            if after_cr and char == "\n":   # the second half of "\r\n"
                after_cr = False
                continue
            after_cr = char == "\r"
            if char not in "\r\n":
                line.append(char)
                continue
            text, line = "".join(line), []
            if not text:
                if data is not None:
                    yield "\n".join(data)
                data = None
            elif text[0] != ":" and text.split(":", 1)[0] == "data":
                value = text[5:]   # after "data:", or "" for a line that is just "data"
                data = (data or []) + [value[1:] if value[:1] == " " else value]


# --- the SSE parser: the tests ------------------------------------------------------------------------------------

def _chunks(data: bytes, cuts: Iterable[int]) -> Iterator[bytes]:
    """`data` cut at these byte offsets (in any order, repeats give empty chunks), as a one-pass iterator."""
    start = 0
    for cut in sorted(cuts):
        yield data[start:cut]
        start = cut
    yield data[start:]


def _parse(parse, chunks: Iterator[bytes]) -> list[str]:
    events = parse(chunks)
    if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
        raise Mismatch(f"parse_sse returned a {type(events).__name__}, expected an iterator of str (yield each event)")
    events = list(events)
    for i, event in enumerate(events):
        if not isinstance(event, str):
            raise Mismatch(f"event {i} is a {type(event).__name__} ({event!r:.40}), expected a str (its data)")
    return events


def _expect_events(parse, stream: bytes, cuts: Iterable[int], what: str) -> int:
    cuts = list(cuts)
    expected = list(reference_parse_sse(_chunks(stream, cuts)))
    actual = _parse(parse, _chunks(stream, cuts))
    if actual != expected:
        i = _first_difference(actual, expected)
        j = _first_difference(actual[i], expected[i]) if i < min(len(actual), len(expected)) else 0
        found = (f"event {i} has {_around(actual[i], j)} at character {j}, expected {_around(expected[i], j)}"
                 if i < min(len(actual), len(expected))
                 else f"{len(actual)} events, expected {len(expected)}; event {i} "
                      + (f"{actual[i]!r:.60} is one too many" if i < len(actual) else f"{expected[i]!r:.60} is missing"))
        cuts = sorted(set(cuts))
        raise Mismatch(f"{what}: {found}; the stream was {stream[:70]!r}{'...' if len(stream) > 70 else ''}, cut "
                       f"at bytes {cuts[:8]}{'...' if len(cuts) > 8 else ''}")
    return len(expected)


def _streams(*cases: tuple[bytes, str], every_cut: bool = False, seed: int = 0):
    """Each stream whole, cut at a few random bytes, and with `every_cut` one byte per chunk."""
    def run(parse) -> str:
        rng, events = random.Random(seed), 0
        for stream, what in cases:
            splits = [[], [rng.randrange(len(stream) + 1) for _ in range(rng.randint(1, 6))]]
            if every_cut:
                splits.append(range(1, len(stream)))
            for cuts in splits:
                events += _expect_events(parse, stream, cuts, what)
        return f"{events} events, exact"

    return run


def _openai_stream(texts: Sequence[str], end: bytes = b"\n\n") -> bytes:
    """A stream as `llminfer serve` writes it: one chat chunk per text delta, then [DONE]."""
    events = [json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]},
                         ensure_ascii=False) for text in texts]
    return b"".join(b"data: " + event.encode() + end for event in [*events, "[DONE]"])


SIMPLE = _openai_stream(["First", " Citizen", ":\n"])
CRLF = b"data: one\r\n\r\ndata: two\r\n\r\n: keep-alive\r\n\r\ndata: three\r\n\r\n"
CR = b"data: one\r\rdata: two\r\r:ping\rdata: three\r\r"
MIXED = b"data: a\r\ndata: b\n\r\ndata: c\r\rdata: d\n\n"
MULTILINE = (b"data: {\ndata:   \"text\": \"two\"\ndata: }\n\n"
             b"data: first\r\ndata:\r\ndata: third\r\n\r\n"
             b"data\ndata\n\n")
FIELDS = (b": a comment\nevent: update\nid: 7\nretry: 1000\ndata:no space\n\n"
          b"data:  two spaces\n\ndata\n\ndata:a:b: c\n\nDATA: not data\nData: not data\ndata: yes\n\n"
          b"unknown: x\ndata : not data either\nid\ndata: :colon first\n\n")
NO_DATA = (b"event: ping\n\n: comment only\n\nid: 3\nretry: 10\n\n\n\n"
           b"data:\n\ndata: \n\ndata: after empty ones\n\n")
UNTERMINATED = (b"data: complete\n\ndata: the end of the stream came\ndata: before the blank line\n",
                b"data: one\n\ndata: two",
                b"data: one\r\n\r\ndata: two\r\n")
SPLIT_CRLF = b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"


def _crlf_cut_between(parse) -> str:
    """Chunks that end right after \\r: the \\n that starts the next chunk ends the same line."""
    cuts = [i + 1 for i, byte in enumerate(SPLIT_CRLF) if byte == ord("\r")]
    _expect_events(parse, SPLIT_CRLF, cuts, "every chunk ends between \\r and \\n")
    return f"{len(cuts)} cuts between \\r and \\n, exact"


HARD_DELTAS = ["Hello 😀", " world 🇯🇵", "! 日本語", "、中文。", " שלום", " مرحبا", " 👩‍👩‍👧", " é"]


def _lazy(parse) -> str:
    """A generator of chunks that records how many were taken: each event must come out before the next chunk is
    read (a client shows the text as it arrives)."""
    events = [b"data: first\n\n", b"data: second\r\n\r\n", b": comment\ndata: third\n\n", b"data: [DONE]\n\n"]
    taken = []

    def chunks():
        for i, event in enumerate(events):
            taken.append(i)
            yield event

    result = parse(chunks())
    if not isinstance(result, Iterator):
        raise Mismatch(f"parse_sse returned a {type(result).__name__} after reading all {len(taken)} chunks; "
                       "make it a generator that yields each event as soon as its blank line arrives")
    for i in range(len(events)):
        try:
            event = next(result)
        except StopIteration:
            raise Mismatch(f"the stream ended after {i} events, expected {len(events)}") from None
        if len(taken) != i + 1:
            raise Mismatch(f"event {i} ({event!r:.20}) came out after reading {len(taken)} chunks; it ends in chunk "
                           f"{i}: yield each event as soon as its blank line arrives, before reading on")
    return f"each of {len(events)} events before the next chunk"


_ALPHABET = "ab :,{}\"é日本😀🇯🇵שמ ع\t\\"
_FIELDS = ("event: message", "id: 12", "retry: 3000", "Data: ignored", "data_: ignored", "x")


def _random_stream(rng: random.Random, hard: bool) -> bytes:
    """Events with 1 to 3 data lines of random text; with `hard`, every line end, comments, other fields,
    events without data, a byte order mark, and an unterminated event at the end."""
    lines: list[str] = []
    for _ in range(rng.randint(1, 6)):
        if hard and rng.random() < 0.5:
            lines.append(rng.choice((": comment", ":", *_FIELDS)))
        if not (hard and rng.random() < 0.1):   # an event without data
            for _ in range(rng.randint(1, 3)):
                value = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 12)))
                if hard and not value and rng.random() < 0.5:
                    lines.append("data")
                elif hard and not value.startswith(" ") and rng.random() < 0.5:
                    lines.append("data:" + value)
                else:
                    lines.append("data: " + value)
        lines.append("")
    if hard and rng.random() < 0.3:
        lines.append("data: unterminated")
    out = []
    for line in lines:
        end = rng.choice(("\n", "\r\n", "\r")) if hard else "\n"
        if out and out[-1].endswith("\r") and not line and end == "\n":
            end = "\r"   # "\r" then an empty line ending "\n" would read as one "\r\n"
        out.append(line + end)
    if hard and rng.random() < 0.3 and lines[-1] == "data: unterminated":
        out[-1] = out[-1].rstrip("\r\n")
    return ("\ufeff" if hard and rng.random() < 0.1 else "").encode() + "".join(out).encode()


def _random_streams(seed: int, cases: int, hard: bool):
    def run(parse) -> str:
        rng, events = random.Random(seed), 0
        for case in range(cases):
            stream = _random_stream(rng, hard)
            cuts = [rng.randrange(len(stream) + 1) for _ in range(rng.randint(0, len(stream) // 3 + 1))]
            events += _expect_events(parse, stream, cuts, f"random stream {case}")
        return f"{cases} streams, {events} events, exact"

    return run


SSE_TESTS = (
    ExerciseTest("a stream as the server writes it: data lines ending in \\n", 1, _streams((SIMPLE, "\\n line ends"))),
    ExerciseTest("lines ending in \\r\\n", 2, _streams((CRLF, "\\r\\n line ends"))),
    ExerciseTest("lines ending in \\r, and the three line ends mixed", 1,
                 _streams((CR, "\\r line ends"), (MIXED, "mixed line ends"))),
    ExerciseTest("a chunk ends between \\r and \\n", 1, _crlf_cut_between),
    ExerciseTest("emoji, CJK and right-to-left text cut inside characters", 2,
                 _streams((_openai_stream(HARD_DELTAS), "multi-byte characters"), every_cut=True, seed=4)),
    ExerciseTest("data on several lines is joined with \\n", 2, _streams((MULTILINE, "several data lines"))),
    ExerciseTest("comments, other fields, data: with and without a space", 1, _streams((FIELDS, "fields"))),
    ExerciseTest("an event without data is not dispatched; a bare data: is the empty string", 1,
                 _streams((NO_DATA, "events without data"))),
    ExerciseTest("an event the stream ends in the middle of is dropped", 1,
                 _streams(*((stream, "unterminated last event") for stream in UNTERMINATED))),
    ExerciseTest("each event comes out as soon as its blank line arrives", 1, _lazy),
    ExerciseTest("random events cut at random bytes", 2, _random_streams(seed=5, cases=150, hard=False)),
    ExerciseTest("random events, line ends, comments and fields cut at random bytes", 2,
                 _random_streams(seed=6, cases=300, hard=True), visible=False),
)


EXERCISES = [
    Exercise("sse_parse", "reading a server-sent-event stream", CHAPTER, "parse_sse", reference_parse_sse,
             SSE_TESTS, mirrors=LIBRARY),
    Exercise("incremental_detokenizer", "streaming text: an incremental detokenizer", CHAPTER,
             "IncrementalDetokenizer", ReferenceIncrementalDetokenizer, DETOKENIZER_TESTS,
             setup=_tokenizer, mirrors=LIBRARY, warm=("tokenizer",)),
]
