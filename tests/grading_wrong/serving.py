"""Wrong incremental detokenizers and wrong server-sent-event parsers."""

import codecs

from llminfer.serve.detokenizer import IncrementalDetokenizer as LibraryDetokenizer
from llminfer.serve.sse import parse_sse as library_parse_sse

REPLACEMENT = "\ufffd"


# --- detokenizers --------------------------------------------------------------------------------------------------

class RightDetokenizer:
    """A right answer, decoding the whole output at every call (O(n^2) over a stream, and still right); the
    wrong ones below change one thing each."""

    def __init__(self, tokenizer, stop=(), min_tokens=0):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.min_tokens = min_tokens if stop else 0
        self.sent = ""

    def safe_text(self, token_ids) -> str:
        text = self.tokenizer.decode(list(token_ids)).rstrip(REPLACEMENT)
        return text[:max(0, len(text) - self.holdback)]

    def update(self, token_ids) -> str:
        if len(token_ids) < self.min_tokens:
            return ""
        safe = self.safe_text(token_ids)
        if len(safe) <= len(self.sent):
            return ""
        delta = safe[len(self.sent):]
        self.sent = safe
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
        self.sent += delta
        return delta


class DecodesOnlyNewTokens(RightDetokenizer):
    """decode(new_ids) each call: a character whose bytes span two calls comes out as two U+FFFD."""

    def __init__(self, tokenizer, stop=(), min_tokens=0):
        super().__init__(tokenizer, stop, min_tokens)
        self.seen = 0

    def update(self, token_ids) -> str:
        delta = self.tokenizer.decode(list(token_ids[self.seen:]))
        self.seen = len(token_ids)
        self.sent += delta
        return delta


class NoStopHoldback(RightDetokenizer):
    """Sends every complete character at once: the start of a stop string goes out before the engine cuts it."""

    def safe_text(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids)).rstrip(REPLACEMENT)


class NeverFlushesReplacement(RightDetokenizer):
    """Holds back U+FFFD forever: finish drops it too, when the request ended inside a character."""

    def finish(self, final_text: str) -> str:
        return super().finish(final_text.rstrip(REPLACEMENT))


class WaitsWhileAnyReplacement(RightDetokenizer):
    """Sends nothing past the first U+FFFD until finish, even when it is an invalid byte that will stay U+FFFD."""

    def safe_text(self, token_ids) -> str:
        text = self.tokenizer.decode(list(token_ids)).split(REPLACEMENT)[0]
        return text[:max(0, len(text) - self.holdback)]


class HoldsBackWholeStop(RightDetokenizer):
    """Holds back len(stop) characters, one more than needed: safe, but slower than it has to be."""

    def __init__(self, tokenizer, stop=(), min_tokens=0):
        super().__init__(tokenizer, stop, min_tokens)
        self.holdback = max((len(s) for s in stop), default=0)


class FirstStopHoldback(RightDetokenizer):
    """Holds back for the first stop string given, not the longest."""

    def __init__(self, tokenizer, stop=(), min_tokens=0):
        super().__init__(tokenizer, stop, min_tokens)
        self.holdback = len(stop[0]) - 1 if stop else 0


class IgnoresMinTokens(RightDetokenizer):
    """Sends text before min_tokens: a stop string in it still cuts the final text there once min_tokens is reached."""

    def __init__(self, tokenizer, stop=(), min_tokens=0):
        super().__init__(tokenizer, stop, 0)


class NegativeHoldbackIndex(RightDetokenizer):
    """text[:len(text) - holdback] while the text is shorter than the holdback: a negative end counts from the end."""

    def safe_text(self, token_ids) -> str:
        text = self.tokenizer.decode(list(token_ids)).rstrip(REPLACEMENT)
        return text[:len(text) - self.holdback]


class WrapsTheLibrary(LibraryDetokenizer):
    """Right, but it is llminfer's own detokenizer."""


# --- SSE parsers -----------------------------------------------------------------------------------------------------

def events_from_lines(lines, last_data_only=False, strip_all=False, dispatch_empty=False):
    """The field rules over complete lines (with the wrong variants' switches)."""
    data = []
    for line in lines:
        if not line:
            if data or dispatch_empty:
                yield "\n".join(data)
            data = []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.strip() if strip_all else value[1:] if value.startswith(" ") else value
            if name == "data":
                data = [value] if last_data_only else [*data, value]


def lines_of(texts, crlf_split_bug=False, unterminated=False):
    """Complete lines of a stream of decoded texts. With `crlf_split_bug`, a "\\n" at the start of a chunk after
    one that ended in "\\r" is a line end of its own (an extra blank line); with `unterminated`, the last line
    and a blank one are given at the end even if the stream did not end them."""
    pending, after_cr = "", False
    for text in texts:
        if not text:
            continue
        i = 0
        if after_cr and text[0] == "\n" and not crlf_split_bug:
            i = 1
        while i < len(text):
            char = text[i]
            if char == "\r" and text[i + 1:i + 2] == "\n":
                yield pending
                pending, i = "", i + 2
                continue
            if char in "\r\n":
                yield pending
                pending = ""
            else:
                pending += char
            i += 1
        after_cr = text.endswith("\r")
    if unterminated:
        yield pending
        yield ""


def decoded(chunks):
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    for chunk in chunks:
        yield decoder.decode(chunk)


def splits_on_blank_lf_only(chunks):
    """Events split on "\\n\\n" and lines on "\\n": \\r\\n and \\r line ends are not seen."""
    buffer = ""
    for text in decoded(chunks):
        buffer += text
        while "\n\n" in buffer:
            event, buffer = buffer.split("\n\n", 1)
            yield from events_from_lines([*event.split("\n"), ""])


def decodes_each_chunk(chunks):
    """Each chunk decoded on its own: a character cut between chunks becomes U+FFFD."""
    yield from events_from_lines(lines_of(chunk.decode("utf-8", errors="replace") for chunk in chunks))


def last_data_line_only(chunks):
    """An event's data lines overwrite each other instead of being joined with "\\n"."""
    yield from events_from_lines(lines_of(decoded(chunks)), last_data_only=True)


def strips_the_value(chunks):
    """Strips all whitespace around a value, not one space after the colon."""
    yield from events_from_lines(lines_of(decoded(chunks)), strip_all=True)


def dispatches_events_without_data(chunks):
    """Every blank line dispatches an event, "" when it had no data."""
    yield from events_from_lines(lines_of(decoded(chunks)), dispatch_empty=True)


def dispatches_the_unterminated_event(chunks):
    """At the end of the stream, the open event is dispatched instead of dropped."""
    yield from events_from_lines(lines_of(decoded(chunks), unterminated=True))


def crlf_split_between_chunks(chunks):
    """A \\r at the end of one chunk and the \\n at the start of the next end two lines, not one."""
    yield from events_from_lines(lines_of(decoded(chunks), crlf_split_bug=True))


def reads_the_whole_stream_first(chunks):
    """Right events, but only once the whole stream has arrived: a client would show nothing until the end."""
    return list(events_from_lines(lines_of(decoded([b"".join(chunks)]))))


def calls_the_library(chunks):
    """Right, but it is llminfer's own parser."""
    return library_parse_sse(chunks)


WRONG = {
    "incremental_detokenizer": {
        "decodes only the new tokens": DecodesOnlyNewTokens,
        "no stop-string holdback": NoStopHoldback,
        "never flushes a trailing U+FFFD": NeverFlushesReplacement,
        "waits while any U+FFFD is in the text": WaitsWhileAnyReplacement,
        "holds back len(stop) characters": HoldsBackWholeStop,
        "holdback from the first stop string": FirstStopHoldback,
        "ignores min_tokens": IgnoresMinTokens,
        "negative index while the text is shorter than the holdback": NegativeHoldbackIndex,
        "subclasses llminfer's detokenizer": WrapsTheLibrary,
    },
    "sse_parse": {
        "splits on \\n\\n only": splits_on_blank_lf_only,
        "decodes each chunk on its own": decodes_each_chunk,
        "keeps only the last data line": last_data_line_only,
        "strips all whitespace from values": strips_the_value,
        "dispatches events without data": dispatches_events_without_data,
        "dispatches an unterminated last event": dispatches_the_unterminated_event,
        "\\r and \\n in two chunks end two lines": crlf_split_between_chunks,
        "reads the whole stream first": reads_the_whole_stream_first,
        "calls llminfer's parse_sse": calls_the_library,
    },
}
