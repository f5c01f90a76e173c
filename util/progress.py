"""Progress reporting that reads well both in a terminal and in a log file.

In a terminal, `progress_bar` is a tqdm bar. When stdout (or the stream the bar would write to) is not a
terminal - a log file, a pipe, CI - a bar would write hundreds of carriage-return frames, so it prints a
plain line every `every` steps instead (by default ten lines per loop, or every 100 steps when the
length is unknown), plus one when the loop ends:

    tiny VAE: 120/400 [00:31<01:13, 3.84 it/s] mse=0.0123

The "n/total [" part is the same as tqdm's, so tools that follow tqdm counters (the demo mirrors each
stage's counter into a bar of its own) read both.
"""
import math
import sys
import time

from tqdm import tqdm

UNKNOWN_TOTAL_EVERY = 100


def is_interactive(stream) -> bool:
    """True when both stdout and `stream` are terminals."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, stream))


def progress_bar(iterable=None, *, total=None, desc=None, disable=False, every=None, file=None, **tqdm_kwargs):
    """A tqdm bar in a terminal, a `PlainProgress` printing every `every` steps otherwise (see the module)."""
    stream = file if file is not None else sys.stderr
    if disable or is_interactive(stream):
        return tqdm(iterable, total=total, desc=desc, disable=disable, file=stream, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, every=every, file=stream,
                         unit=tqdm_kwargs.get("unit", "it"), initial=tqdm_kwargs.get("initial", 0))


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class PlainProgress:
    """The parts of tqdm's interface the project uses (iterate, update, n/total, set_postfix, refresh, close),
    writing one plain line whenever the count crosses a multiple of `every` and once at the end."""

    def __init__(self, iterable=None, total=None, desc=None, every=None, file=None, unit: str = "it",
                 initial: int = 0):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.fixed_every = every
        self.file = file if file is not None else sys.stderr
        self.unit = unit
        self.initial = self.n = initial
        self.postfix = ""
        self.started = time.time()
        self.printed_at = initial
        self.closed = False

    @property
    def every(self) -> int:
        if self.fixed_every:
            return max(1, int(self.fixed_every))
        return max(1, math.ceil(self.total / 10)) if self.total else UNKNOWN_TOTAL_EVERY

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        """Prints a line if the count has crossed a multiple of `every` (or reached the total) since the last one."""
        crossed = self.n // self.every > self.printed_at // self.every
        if self.n != self.printed_at and (crossed or (self.total is not None and self.n >= self.total)):
            self.print_line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc=None, refresh: bool = True) -> None:
        self.desc = desc

    def print_line(self) -> None:
        elapsed = time.time() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0  # since the start
        if self.total:
            remaining = (self.total - self.n) / rate if rate > 0 else 0.0
            counter = f"{self.n}/{self.total} [{format_seconds(elapsed)}<{format_seconds(remaining)}"
        else:
            counter = f"{self.n} [{format_seconds(elapsed)}"
        prefix = f"{self.desc.strip()}: " if self.desc else ""
        postfix = f" {self.postfix}" if self.postfix else ""
        print(f"{prefix}{counter}, {rate:.2f} {self.unit}/s]{postfix}", file=self.file, flush=True)
        self.printed_at = self.n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.printed_at:
            self.print_line()

    @staticmethod
    def write(message: str, file=None) -> None:
        print(message, file=file if file is not None else sys.stdout, flush=True)
