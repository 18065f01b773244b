from adapters.base import TokenLogprob
from adapters.text import DeltaEmitter, StopBuffer, Utf8Stream


def test_stop_string_spanning_pieces_is_cut_and_never_sent():
    buf = StopBuffer(["###"])
    out = []
    for piece in ["Hello #", "#", "# world"]:
        text, stopped = buf.push(piece)
        out.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(out) == "Hello "


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    buf = StopBuffer(["END"])
    assert buf.push("abc E") == ("abc ", False)
    assert buf.push("N") == ("", False)
    assert buf.push("x") == ("ENx", False)
    assert buf.flush() == ""


def test_earliest_of_several_stops_wins_and_flush_returns_held_text():
    buf = StopBuffer(["world", "lo"])
    assert buf.push("hello world") == ("hel", True)
    buf2 = StopBuffer(["\n\n"])
    assert buf2.push("line\n") == ("line", False)
    assert buf2.flush() == "\n"


def test_no_stops_passes_text_through():
    assert StopBuffer([]).push("anything") == ("anything", False)
    assert StopBuffer([""]).push("x") == ("x", False)


def test_utf8_stream_never_splits_a_character():
    data = "héllo → 世界".encode()
    stream = Utf8Stream()
    out = "".join(stream.push(data[i:i + 1]) for i in range(len(data))) + stream.flush()
    assert out == "héllo → 世界"
    assert Utf8Stream().push("é".encode()[:1]) == ""


# --- DeltaEmitter: the tail every local decode loop shares ---------------------------------------


def lp(text: str) -> TokenLogprob:
    return TokenLogprob(text, -0.5, list(text.encode()))


def test_emitter_holds_split_characters_and_carries_logprobs_to_the_text():
    emit = DeltaEmitter([])
    euro = "€".encode()  # three bytes, one per token here
    assert emit.push(euro[:1], lp("a")) is None and emit.push(euro[1:2], lp("b")) is None
    delta = emit.push(euro[2:], lp("c"))
    assert delta.text == "€" and [t.token for t in delta.logprobs] == ["a", "b", "c"]
    last = emit.finish("length", prompt_tokens=7)
    assert last.text == "" and last.finish_reason == "length" and last.logprobs is None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 3)


def test_emitter_cuts_a_stop_string_spanning_tokens():
    emit = DeltaEmitter(["END"])
    assert emit.push(b"ok E").text == "ok " and not emit.stopped  # "E" held: it may begin END
    assert emit.push(b"N") is None and not emit.stopped
    assert emit.push(b"D and more") is None and emit.stopped
    last = emit.finish("length", 1)
    assert last.text == "" and last.finish_reason == "stop" and last.usage.completion_tokens == 3


def test_emitter_flushes_held_text_that_never_became_a_stop():
    emit = DeltaEmitter(["END"])
    assert emit.push(b"x EN").text == "x "
    last = emit.finish("length", 1)
    assert last.text == "EN" and last.finish_reason == "length"
