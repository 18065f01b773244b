from adapters.text import StopBuffer, Utf8Stream


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
