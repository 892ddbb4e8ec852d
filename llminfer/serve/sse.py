"""Reading a server-sent-event stream, as a client of `llminfer serve` (or of any OpenAI-compatible server) does.

The server writes `data: {...}\\n\\n` per chunk, but a parser that splits on "\\n\\n" is wrong in general. The
WHATWG rules (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- The stream is UTF-8; a leading byte order mark is dropped. The network cuts it into chunks anywhere,
  inside a character too, so bytes are decoded incrementally, never chunk by chunk.
- A line ends at "\\r\\n", "\\n" or "\\r" (and "\\r" then "\\n" in the next chunk is still one line end).
- A blank line ends an event. A line starting with ":" is a comment. Otherwise the field name is what comes
  before the first ":" (the whole line if there is none), and the value what comes after, less one space.
- Each `data` field adds a line to the event's data; the event's data are those lines joined by "\\n". An
  event without a `data` field is not dispatched; `data:` alone is the empty string. Other fields
  (`event`, `id`, `retry`) do not change the data and are ignored here.
- An event still open when the stream ends (no blank line after it) is dropped.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator

_LINE_END = re.compile(r"\r\n|\r|\n")


def parse_sse(chunks: Iterable[bytes]) -> Iterator[str]:
    """The data of each event in a stream of bytes cut anywhere, yielded as soon as the event's blank line
    arrives."""
    data: list[str] = []
    for line in _lines(chunks):
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The complete lines of the stream, without their line ends; a last line without one is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")   # -sig: drops a leading BOM
    pending: list[str] = []   # the start of a line whose end has not arrived
    after_cr = False          # the last line ended with "\r": a "\n" right after belongs to that line end
    for chunk in chunks:
        text = decoder.decode(chunk)
        if not text:   # an empty chunk, or the first bytes of a character
            continue
        if after_cr and text.startswith("\n"):
            text = text[1:]
        start = 0
        for end in _LINE_END.finditer(text):
            pending.append(text[start:end.start()])
            yield "".join(pending)
            pending, start = [], end.end()
        pending.append(text[start:])
        after_cr = text.endswith("\r")
