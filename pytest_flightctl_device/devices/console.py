"""The serial console log: qemu writes it to a file (never stalls the guest); we read and match."""

from __future__ import annotations

import re
from pathlib import Path

KERNEL_OUTPUT = re.compile(r"Linux version \d|\[\s*\d+\.\d{6}\] ")
PANIC = re.compile(r"Kernel panic - not syncing[^\n]*")
NO_BOOT_DEVICE = re.compile(r"No bootable device|Boot failed: not a bootable disk|No operating system")
CLOUD_INIT_ERROR = re.compile(
    r"cloud-init\S*:? .*\b(ERROR|CRITICAL)\b[^\n]*|\[(?:ERROR|CRITICAL)\]:[^\n]*"
    r"|Failed to run module [^\n]*"
)


class ConsoleLog:
    """Incremental reader over a console file that a running qemu appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text = ""
        self._offset = 0

    def refresh(self) -> str:
        """Read what qemu appended since the last call; return only the new text."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return ""
        self._offset += len(chunk)
        new = chunk.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
        self._text += new
        return new

    @property
    def text(self) -> str:
        return self._text

    def mark(self) -> int:
        """A position in the text; search(since=mark) ignores what came before (e.g. a reboot)."""
        self.refresh()
        return len(self._text)

    def search(self, pattern: re.Pattern[str] | str, since: int = 0) -> re.Match[str] | None:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return regex.search(self._text, since)

    def tail(self, lines: int = 50) -> str:
        self.refresh()
        return "\n".join(self._text.rstrip("\n").splitlines()[-lines:])
