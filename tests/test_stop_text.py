from api.stop_text import StopTextFilter


def _run(stop, pieces):
    f = StopTextFilter(stop)
    shown = [f.push(p) for p in pieces]
    return shown, f.flush(), f.stopped


def test_text_without_stop_passes_through():
    shown, tail, stopped = _run([], ["Hel", "lo"])
    assert "".join(shown) + tail == "Hello" and not stopped


def test_cuts_at_stop_string_split_across_pieces():
    shown, tail, stopped = _run(["END"], ["abc E", "N", "Dxyz"])
    assert "".join(shown) + tail == "abc " and stopped


def test_holds_back_a_possible_stop_prefix_then_releases_it():
    f = StopTextFilter(["STOP"])
    assert f.push("go ST") == "go "
    assert f.push("ay") == "STay"
    assert f.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    shown, _, _ = _run(["b", "a"], ["xxabc"])
    assert shown == ["xx"]
