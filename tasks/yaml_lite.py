"""The subset of YAML that the CORE bundle's core.yaml is written in, so reading it needs no YAML package.

Block mappings and sequences by indentation (`- key: value` items included), `[a, b]` flow lists, plain,
'single' and "double" quoted scalars (with YAML's escapes), `#` comments. Plain scalars become int, float, bool
or None where YAML 1.1's common forms say so, else str. Anything else (anchors, tags, multi-line scalars, `{}`
mappings) is a ValueError naming the line.
"""

from __future__ import annotations

import re

_ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
            "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028",
            "P": "\u2029"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_INT = re.compile(r"[-+]?[0-9]+$")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


def _quoted_end(text: str, i: int, where: str) -> int:
    """Index just past the quoted scalar that starts at text[i]."""
    quote, j = text[i], i + 1
    while j < len(text):
        if quote == '"' and text[j] == "\\":
            j += 2
        elif text[j] == quote:
            if quote == "'" and text[j + 1:j + 2] == "'":
                j += 2
                continue
            return j + 1
        else:
            j += 1
    raise ValueError(f"{where}: unterminated {quote}-quoted string")


def _unquote(text: str, where: str) -> str:
    body = text[1:-1]
    if text[0] == "'":
        return body.replace("''", "'")
    out, j = [], 0
    while j < len(body):
        ch = body[j]
        if ch != "\\":
            out.append(ch)
            j += 1
            continue
        esc = body[j + 1:j + 2]
        if esc in _HEX_ESCAPES:
            n = _HEX_ESCAPES[esc]
            try:
                out.append(chr(int(body[j + 2:j + 2 + n], 16)))
            except ValueError:
                raise ValueError(f"{where}: bad escape \\{esc}{body[j + 2:j + 2 + n]}") from None
            j += 2 + n
        elif esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            j += 2
        else:
            raise ValueError(f"{where}: unknown escape \\{esc}")
    return "".join(out)


def _strip_comment(line: str, where: str) -> str:
    i = 0
    while i < len(line):
        if line[i] in "'\"" and (i == 0 or line[i - 1] in " \t[,"):
            i = _quoted_end(line, i, where)
        elif line[i] == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
        else:
            i += 1
    return line.rstrip()


def _split_top(text: str, sep: str, where: str) -> list[str]:
    """text split at `sep` outside quotes."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] in "'\"" and text[start:i].strip() == "":
            i = _quoted_end(text, i, where)
        elif text[i] == sep:
            parts.append(text[start:i])
            start = i = i + 1
        else:
            i += 1
    return parts + [text[start:]]


def _scalar(text: str, where: str):
    text = text.strip()
    if text[:1] in ("'", '"'):
        if _quoted_end(text, 0, where) != len(text):
            raise ValueError(f"{where}: text after a quoted string")
        return _unquote(text, where)
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"{where}: unterminated [list]")
        inner = text[1:-1].strip()
        return [_scalar(p, where) for p in _split_top(inner, ",", where)] if inner else []
    if text[:1] in ("{", "&", "*", "!", "|", ">", "%", "@", "`"):
        raise ValueError(f"{where}: unsupported YAML {text[:1]!r}")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def _key_value(content: str, where: str) -> tuple[str, str] | None:
    """("key", "rest") for a `key: rest` line, None when the line is no mapping entry."""
    if content[:1] in ("'", '"'):
        end = _quoted_end(content, 0, where)
        if content[end:end + 1] != ":" or content[end + 1:end + 2] not in ("", " "):
            return None
        return _unquote(content[:end], where), content[end + 1:].strip()
    m = re.match(r"([^\s#:'\"\[\]{},][^:]*?)\s*:(?:\s+|$)", content)
    return (m.group(1), content[m.end():].strip()) if m else None


def _is_item(content: str) -> bool:
    return content == "-" or content.startswith("- ")


def _block(lines: list, i: int, where: str):
    """The mapping or sequence whose first line is lines[i], and the index of the line after it."""
    lineno, indent, content = lines[i]
    out: list | dict = [] if _is_item(content) else {}
    while i < len(lines):
        lineno, ind, content = lines[i]
        at = f"{where}:{lineno}"
        if ind < indent:
            break
        if ind > indent:
            raise ValueError(f"{at}: unexpected indentation")
        nested = i + 1 < len(lines) and (lines[i + 1][1] > indent or
                                         (isinstance(out, dict) and _is_item(lines[i + 1][2]) and
                                          lines[i + 1][1] == indent))
        if isinstance(out, list):
            if not _is_item(content):  # a list under `key:` at the key's own indentation ends here
                break
            rest = content[1:].lstrip()
            if not rest:
                value, i = _block(lines, i + 1, where) if nested else (None, i + 1)
            elif _is_item(rest) or _key_value(rest, at):  # `- key: value` opens a mapping at the key's column
                lines[i] = (lineno, ind + len(content) - len(rest), rest)
                value, i = _block(lines, i, where)
            else:
                value, i = _scalar(rest, at), i + 1
            out.append(value)
        else:
            kv = _key_value(content, at)
            if kv is None:
                raise ValueError(f"{at}: expected 'key: value'")
            key, rest = kv
            if rest:
                out[key], i = _scalar(rest, at), i + 1
            else:
                out[key], i = _block(lines, i + 1, where) if nested else (None, i + 1)
    return out, i


def parse_yaml(text: str, where: str = "<yaml>"):
    """The document in `text` (the subset above), as dicts, lists, str, int, float, bool and None."""
    lines = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if raw.strip() in ("---", "..."):
            continue
        body = raw.lstrip(" ")
        if body.startswith("\t"):
            raise ValueError(f"{where}:{lineno}: a tab in the indentation")
        content = _strip_comment(body, f"{where}:{lineno}")
        if content:
            lines.append((lineno, len(raw) - len(body), content))
    if not lines:
        return None
    value, i = _block(lines, 0, where)
    if i < len(lines):
        raise ValueError(f"{where}:{lines[i][0]}: unexpected indentation")
    return value
