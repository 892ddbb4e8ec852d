"""Answer key for the exercise `sse_parse` (chapter 11, serving): reading a server-sent-event stream.

The bytes arrive in chunks cut anywhere: inside a UTF-8 character, inside a line, between the `\\r` and the `\\n`
of a `\\r\\n`. An incremental decoder keeps the first bytes of a cut character until the rest arrives; the start of
an unfinished line is kept between chunks; and a chunk that ends in `\\r` leaves a flag, so that a `\\n` starting the
next chunk is read as the second half of that `\\r\\n`, not as a blank line.
"""

import codecs
import re
from collections.abc import Iterable, Iterator

_LINE_END = re.compile(r"\r\n|\r|\n")   # tried in this order at each position: "\r\n" is one line end


def _field(line: str) -> tuple[str, str]:
    """A non-blank, non-comment line as (name, value): the name is what comes before the first ':' (the whole
    line if there is none), the value what comes after, less one leading space."""
    name, colon, value = line.partition(":")
    if colon and value.startswith(" "):
        value = value[1:]
    return name, value


def parse_sse(chunks: Iterable[bytes]) -> Iterator[str]:
    """The data of each event in a stream of bytes cut anywhere, yielded as soon as the event's blank line
    arrives."""
    # "utf-8-sig" drops a byte order mark at the very start; errors="replace" turns invalid bytes into U+FFFD.
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    pending = ""          # the start of a line whose end has not arrived yet
    after_cr = False      # the last line ended in a "\r" at the very end of the decoded text so far
    data: list[str] | None = None   # the current event's data lines; None until it has a data field

    for chunk in chunks:
        text = decoder.decode(chunk)
        if not text:      # an empty chunk, or only the first bytes of a character: nothing changes
            continue
        if after_cr and text.startswith("\n"):
            text = text[1:]   # the "\n" of a "\r\n" cut between two chunks: that line already ended
        after_cr = False

        buffer, start = pending + text, 0
        while (end := _LINE_END.search(buffer, start)) is not None:
            line, start = buffer[start:end.start()], end.end()
            if end.group() == "\r" and start == len(buffer):
                after_cr = True   # the line ends here even if a "\n" follows in the next chunk
            if not line:                          # a blank line ends the event
                if data is not None:
                    yield "\n".join(data)         # at once, before the next chunk is read
                data = None
            elif not line.startswith(":"):        # a line starting with ':' is a comment
                name, value = _field(line)
                if name == "data":                # other fields (event, id, retry, ...) are ignored here
                    data = (data or []) + [value]
        pending = buffer[start:]
    # The stream ended: an unfinished line, and an event without its blank line, are dropped.
