"""The batch progress bar: drawn only on a terminal, with finished requests and tokens/s."""
import io

from runtime.progress import ProgressBar, is_terminal


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_off_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream)
    bar.update(100, 5000)
    bar.close()
    assert not bar.enabled and stream.getvalue() == ""


def test_off_for_a_few_requests_even_on_a_terminal():
    assert not ProgressBar(7, stream=Terminal()).enabled
    assert ProgressBar(8, stream=Terminal()).enabled


def test_draws_requests_and_tokens_per_second_at_most_every_interval():
    stream, clock = Terminal(), Clock()
    bar = ProgressBar(10, stream=stream, clock=clock, min_interval=0.5)
    clock.now = 0.1
    bar.update(1, 100)          # too soon after the start: not drawn
    assert stream.getvalue() == ""
    clock.now = 1.0
    bar.update(5, 100)
    assert stream.getvalue() == "\r[" + "=" * 15 + " " * 15 + "] 5/10 requests, 200 tokens, 200 tok/s"
    clock.now = 2.0
    bar.update(10, 200)
    bar.close()
    assert stream.getvalue().endswith("10/10 requests, 400 tokens, 200 tok/s\n")


def test_forced_on_and_off():
    assert ProgressBar(1, stream=io.StringIO(), enabled=True).enabled
    assert not ProgressBar(100, stream=Terminal(), enabled=False).enabled


def test_a_closed_stream_is_no_terminal():
    stream = io.StringIO()
    stream.close()
    assert not is_terminal(stream) and not is_terminal(object())
