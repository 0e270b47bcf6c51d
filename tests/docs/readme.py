"""The commands README.md shows, as a reader would paste them into a terminal.

Commands come from fenced code blocks (no language, or a shell one) and from indented code blocks. A line
ending in a backslash continues on the next; a `$ ` prompt is dropped; a `#` after a blank (outside quotes)
starts the comment, which is kept apart because a comment shaped like JSON documents the answer's keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "shell-session", "zsh", "text"}
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$", re.S)
# Commands that only read, or write a file in the current folder, and need no extra program: run by the test.
SAFE_PROGRAM = re.compile(
    r"^(?:\S*/)?python3?\s+(?:(?:\S*/)?manage\.py\s+(?:verify_ledger|export_ledger|check_guardrails)\b"
    r"|-m\s+ledger\.verify\b)")


@dataclass(frozen=True)
class Command:
    line: int  # README.md line where the command starts
    text: str  # continuation lines joined, the comment removed
    comment: str = ""

    @property
    def assigns(self) -> str | None:
        """The shell variable this line sets (`TOKEN=$(curl …)`), if it is only an assignment (not
        `NAME=value command`, which runs a command with that environment)."""
        match = ASSIGNMENT.match(self.text)
        if not match:
            return None
        value = match.group(2)
        return match.group(1) if shell_word_end(value) == len(value.rstrip()) else None

    @property
    def uses_curl(self) -> bool:
        return re.search(r"(?:^|[\s($|;&])curl\s", self.text) is not None

    @property
    def is_safe_program(self) -> bool:
        return SAFE_PROGRAM.match(self.text) is not None

    @property
    def documented_keys(self) -> list[str]:
        """Keys a JSON-shaped comment promises (`# {"seq": N, "hash": "..."}`)."""
        if not self.comment.startswith("{"):
            return []
        return re.findall(r'"(\w+)"\s*:', self.comment)

    def __str__(self) -> str:
        return f"README.md line {self.line}: {self.text}"


def code_blocks(markdown: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) for every shell-like fenced or indented block."""
    lines = markdown.splitlines()
    i = 0
    previous_blank = True
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            marker, language = fence.group(1), fence.group(2).lower()
            start, i = i + 1, i + 1
            while i < len(lines) and not lines[i].lstrip().startswith(marker):
                i += 1
            if language in SHELL_LANGUAGES:
                yield start + 1, lines[start:i]
            i += 1
            previous_blank = False
            continue
        if previous_blank and re.match(r"^( {4}|\t)\S", lines[i]):
            start = i
            while i < len(lines) and (re.match(r"^( {4}|\t)", lines[i]) or not lines[i].strip()):
                i += 1
            yield start + 1, [line[4:] if line.startswith("    ") else line.lstrip("\t") for line in lines[start:i]]
            previous_blank = True
            continue
        previous_blank = not lines[i].strip()
        i += 1


def shell_word_end(text: str) -> int:
    """Where the first shell word of ``text`` ends: quotes and ``$(…)`` may hold blanks."""
    quote, depth = "", 0
    pos = 0
    while pos < len(text):
        char = text[pos]
        if quote:
            if char == "\\" and quote == '"':
                pos += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif text.startswith("$(", pos):
            depth += 1
            pos += 1
        elif char == ")" and depth:
            depth -= 1
        elif char.isspace() and not depth:
            return pos
        pos += 1
    return pos


def split_comment(line: str) -> tuple[str, str]:
    """The code and the comment of one shell line; a `#` inside quotes or a word is not a comment."""
    quote = ""
    for pos, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (pos == 0 or line[pos - 1].isspace()):
            return line[:pos].rstrip(), line[pos + 1:].strip()
    return line.rstrip(), ""


def commands(markdown: str) -> list[Command]:
    found = []
    for first, lines in code_blocks(markdown):
        i = 0
        while i < len(lines):
            start = i
            parts = [lines[i]]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1].rstrip()[:-1]
                i += 1
                parts.append(lines[i].strip())
            i += 1
            text = " ".join(p.strip() if n else p for n, p in enumerate(parts)).strip()
            if text.startswith("$ "):
                text = text[2:]
            code, comment = split_comment(text)
            if code:
                found.append(Command(line=first + start, text=code, comment=comment))
    return found
