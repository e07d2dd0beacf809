"""Reading whitespace-separated annotation files with errors that name the file, the line and the text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fgvc.errors import FGVCError


class AnnotationError(FGVCError, ValueError):
    """A missing, malformed or inconsistent annotation file. The message says where ("path:line") and what."""


def annotation_error(path: Path, line_number: int, text: str, problem: str) -> AnnotationError:
    return AnnotationError(f"{path}:{line_number}: {problem} (line: {text.strip()!r})")


def read_records(path: Path, num_fields: int, *, rest_in_last: bool = False,
                 extra_fields: bool = False) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line number, line, fields) for each non-blank line of `path`.

    rest_in_last: the last field takes the rest of the line (names with spaces, such as "left eye").
    extra_fields: lines may have more than `num_fields` fields; only the first `num_fields` are returned.
    A line with too few (or, by default, too many) fields raises AnnotationError naming it.
    """
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line_number = path.read_bytes()[: error.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{line_number}: not UTF-8 text ({error.reason})") from error
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=num_fields - 1) if rest_in_last else line.split()
        if len(fields) < num_fields or (len(fields) > num_fields and not extra_fields):
            raise annotation_error(path, line_number, line, f"expected {num_fields} fields, found {len(fields)}")
        yield line_number, line, fields[:num_fields]


def parse_int(path: Path, line_number: int, line: str, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise annotation_error(path, line_number, line, f"{what} must be an integer, got {value!r}") from None


def parse_float(path: Path, line_number: int, line: str, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise annotation_error(path, line_number, line, f"{what} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise annotation_error(path, line_number, line, f"{what} must be finite, got {value!r}")
    return number
