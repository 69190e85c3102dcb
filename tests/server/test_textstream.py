"""ChoiceStream: UTF-8 characters never split, stop strings never leaked, leftovers become U+FFFD."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.textstream import ChoiceStream


def run(chunks: list[bytes], stops=(), stop=None) -> list[str]:
    """Feed chunks (the last as the final output); return the text of each released piece."""
    s = ChoiceStream(tuple(stops))
    pieces = [s.feed(c, i) for i, c in enumerate(chunks[:-1])]
    pieces.append(s.finish(chunks[-1], len(chunks) - 1, stop))
    return [p.text for p in pieces if p is not None]


def test_multibyte_characters_split_across_steps_are_whole_in_events():
    text = "한국어 😀 𝔘 é"
    data = text.encode()
    pieces = run([bytes([b]) for b in data])
    assert "".join(pieces) == text
    for p in pieces:
        assert "\ufffd" not in p
    assert pieces[0] == "한" and "😀" in pieces


def test_stop_string_across_steps_never_leaks():
    data = b"Hello STOP"
    chunks = [bytes([b]) for b in data]
    pieces = run(chunks, stops=[b"STOP", b"NEVERMATCHED!"], stop=b"STOP")
    assert "".join(pieces) == "Hello "
    assert all("S" not in p for p in pieces)


def test_stop_prefix_that_does_not_complete_is_flushed():
    pieces = run([b"a", b"S", b"T", b"x", b"y"], stops=[b"STOP"])
    assert "".join(pieces) == "aSTxy"


def test_invalid_bytes_become_replacement_only_at_the_end():
    pieces = run([b"ok ", b"\xe4", b"\xb8"])  # an unfinished 3-byte character when the request ends
    assert pieces == ["ok ", "\ufffd"]


def test_extras_travel_with_their_bytes():
    s = ChoiceStream(())
    assert s.feed(b"\xf0", "a") is None
    assert s.feed(b"\x9f\x98", "b") is None
    piece = s.feed(b"\x80", "c")
    assert piece.text == "😀" and piece.entries == ["a", "b", "b", "c"] and piece.offset == 0
    piece = s.finish(b"!", "d")
    assert piece.text == "!" and piece.entries == ["d"] and piece.offset == 4


characters = st.sampled_from(["a", " ", "é", "한", "😀", "\n", "S", "T"])


@given(st.lists(characters, min_size=1, max_size=30), st.lists(st.integers(1, 4), min_size=1, max_size=30),
       st.sampled_from([(), (b"ST",), (b"\xed\x95\x9c",), (b"a b", b"T")]))
def test_any_split_gives_the_text_before_the_stop(chars, sizes, stops):
    data = "".join(chars).encode()
    first = min((data.find(s) + len(s) for s in stops if s in data), default=len(data))
    matched = next((s for s in stops if data.find(s) + len(s) == first and s in data), None)
    data = data[:first]  # the engine stops at the first completed stop string
    chunks, i, k = [], 0, 0
    while i < len(data):
        chunks.append(data[i:i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    chunks = chunks or [b""]
    if matched and len(chunks[-1]) > 1:  # the stop completes with the final step's last byte
        chunks[-1:] = [chunks[-1][:-1], chunks[-1][-1:]]
    pieces = run(chunks, stops, matched)
    expected = data[:len(data) - len(matched)] if matched else data
    assert "".join(pieces) == expected.decode("utf-8", "replace")
    sent = b""
    for p in pieces[:-1]:  # no event before the last ever holds part of a stop string or half a character
        assert "\ufffd" not in p
        sent += p.encode()
    assert all(s not in sent for s in stops)


class AlwaysHeld(ChoiceStream):
    """ChoiceStream without its one-ASCII-byte shortcut: every byte through the decoder."""

    def feed(self, data: bytes, extra=None):
        return self._feed(data, extra)


fragments = st.sampled_from([b"a", b" ", b"\n", "é".encode(), "한".encode(), "😀".encode(),
                             b"\xc3", b"\xe4\xb8", b"\xff", b"\x80"])  # some never finish a character


@given(st.lists(fragments, min_size=1, max_size=40), st.integers(0, 40))
def test_the_ascii_shortcut_changes_no_piece(parts, whole_from):
    """Text, offsets and extras of every piece are those of the decoder's path, whatever mix of ASCII
    bytes, split or unfinished characters and multi-byte steps comes."""
    data = b"".join(parts)
    chunks = [data[i:i + 1] for i in range(min(whole_from, len(data)))] + [data[whole_from:]]
    fast, slow = ChoiceStream(()), AlwaysHeld(())
    for i, chunk in enumerate(chunks):
        got, want = fast.feed(chunk, i), slow.feed(chunk, i)
        assert (got is None and want is None) or (got.text, got.offset, got.entries) == \
            (want.text, want.offset, want.entries)
    assert fast.finish(b"", -1) == slow.finish(b"", -1) and fast.released == slow.released
