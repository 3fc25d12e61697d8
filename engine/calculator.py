"""The calculator tool of SPEC §11: a tiny interpreter over Python's `ast`, never `eval`.

Allowed: int and float literals, + - * / // % ** (binary), unary + and -, parentheses, string literals, and
one string method, `"text".count("sub")`, whose int result can take part in arithmetic. Everything else
(names, builtins, attributes other than a literal's .count, calls, subscripts, comprehensions, lambdas,
comparisons) is refused. Size limits keep every step cheap: the expression length, the nesting depth, the
digits of every int, the magnitude of exponents and the length of strings; a deadline is checked at every node.

`calculate(expr)` returns the result as a string, or a string starting with ERROR (never raises).
"""

from __future__ import annotations

import ast
import math
import operator
import time

ERROR = "error"  # results that start with this are refusals or failures
MAX_EXPR_CHARS = 300
MAX_DEPTH = 40
MAX_INT_DIGITS = 200
MAX_EXPONENT = 1000
MAX_STR_CHARS = 1000
# The evaluating thread's CPU seconds: a backstop behind the size limits. A loaded machine does not count against it,
# and a full garbage collection in a large process (a few hundred ms) stays under it.
TIME_LIMIT_S = 1.0

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def _check_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CalculatorError("arithmetic needs numbers")
    if isinstance(x, int) and x.bit_length() > MAX_INT_DIGITS * 3.33:
        raise CalculatorError(f"number larger than {MAX_INT_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    return x


def _power(base, exp):
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponent beyond +-{MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and base not in (0, 1, -1):
        if math.log10(abs(base)) * exp > MAX_INT_DIGITS:  # refuse before computing it
            raise CalculatorError(f"number larger than {MAX_INT_DIGITS} digits")
    if base == 0 and exp < 0:
        raise CalculatorError("division by zero")
    result = base**exp
    if isinstance(result, complex):
        raise CalculatorError("complex result")
    return result


class _Evaluator:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def visit(self, node: ast.AST, depth: int = 0):
        if time.thread_time() > self.deadline:
            raise CalculatorError("time limit exceeded")
        if depth > MAX_DEPTH:
            raise CalculatorError("expression nested too deeply")
        if isinstance(node, ast.Expression):
            return self.visit(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if len(node.value) > MAX_STR_CHARS:
                    raise CalculatorError("string too long")
                return node.value
            return _check_number(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _check_number(_UNARY[type(node.op)](_check_number(self.visit(node.operand, depth + 1))))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a = _check_number(self.visit(node.left, depth + 1))
            b = _check_number(self.visit(node.right, depth + 1))
            if isinstance(node.op, ast.Pow):
                return _check_number(_power(a, b))
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise CalculatorError("division by zero")
            return _check_number(_BINARY[type(node.op)](a, b))
        if isinstance(node, ast.Call):
            return self.count(node, depth)
        raise CalculatorError(f"{type(node).__name__} is not allowed")

    def count(self, node: ast.Call, depth: int) -> int:
        """The one allowed call: <string>.count(<string>)."""
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr == "count" and not node.keywords and len(node.args) == 1):
            raise CalculatorError("only <string>.count(<string>) may be called")
        text, sub = self.visit(f.value, depth + 1), self.visit(node.args[0], depth + 1)
        if not (isinstance(text, str) and isinstance(sub, str)):
            raise CalculatorError("count works on strings only")
        return text.count(sub)


def _format(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.12g}"
    return str(x)


def calculate(expr: str, time_limit_s: float = TIME_LIMIT_S) -> str:
    """Evaluate `expr` (see the module docstring); the result as text, or "error: <reason>"."""
    if not isinstance(expr, str):
        return f"{ERROR}: expression must be text"
    expr = expr.strip().replace(",", "") if _is_plain_number_list(expr) else expr.strip()
    if not expr:
        return f"{ERROR}: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"{ERROR}: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        tree = ast.parse(expr, mode="eval")
        return _format(_Evaluator(time.thread_time() + time_limit_s).visit(tree))
    except CalculatorError as e:
        return f"{ERROR}: {e}"
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError, TypeError) as e:
        return f"{ERROR}: {type(e).__name__}"


def _is_plain_number_list(expr: str) -> bool:
    """Digits written with thousands separators ("1,000 * 3") are read as numbers, not tuples."""
    return "," in expr and not any(c in expr for c in "\"'")
