"""A quiet progress display: a redrawn bar on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    def __init__(
        self, title: str, total: int, stream: TextIO = sys.stderr, width: int = 28
    ) -> None:
        self.title, self.total, self.stream, self.width = title, max(total, 1), stream, width
        self.tty = stream.isatty()
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if self.tty:
            filled = int(self.width * done / self.total)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.title} [{bar}] {done}/{self.total} {note[:40]:<40}")
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.title}: {done}/{self.total} {note}\n")
        self.stream.flush()
