"""The calculator tool: arithmetic and string counting work; everything else is refused, quickly."""

import time

import pytest
from tritonchat.engine.calculator import ERROR, MAX_EXPR_CHARS, calculate


@pytest.mark.parametrize("expr,want", [
    ("12*7", "84"),
    (" 3 + 4 * (2 - 7) ", "-17"),
    ("10/4", "2.5"),
    ("10/2", "5"),
    ("7 // 2 + 7 % 3", "4"),
    ("2**10", "1024"),
    ("2**-2", "0.25"),
    ("-(3.5) * +2", "-7"),
    ("1/3", "0.333333333333"),
    ("1,000 * 3", "3000"),
    ("'strawberry'.count('r')", "3"),
    ("\"banana\".count(\"an\") * 10 + 1", "21"),
    ("'hello'", "hello"),
])
def test_calculates(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "open('/etc/passwd').read()",
    "x + 1",
    "(1).real",
    "'abc'.upper()",
    "'abc'.count",
    "'abc'.count(1)",
    "'abc'.count('a', 1)",
    "().__class__.__bases__",
    "[1, 2][0]",
    "lambda: 1",
    "1 if 1 else 2",
    "1 < 2",
    "'a' * 10",
    "'a' + 'b'",
    "1/0",
    "5 % 0",
    "0 ** -1",
    "9**9**9",
    "10**1000",
    "2.5**10000",
    "(-8) ** 0.5",
    "-" * 200 + "1",
    "1 +",
    "",
    "1" * (MAX_EXPR_CHARS + 1),
    "True + 1",
])
def test_refuses(expr):
    start = time.monotonic()
    out = calculate(expr)
    assert out.startswith(ERROR + ":"), (expr, out)
    assert time.monotonic() - start < 0.5


def test_time_limit_and_non_text():
    assert calculate("1 + 2 + 3", time_limit_s=-1.0) == f"{ERROR}: time limit exceeded"
    assert calculate(None).startswith(ERROR)
