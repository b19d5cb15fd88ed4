"""A strict grammar for the symbolic shape expressions of a ``.pt2`` program.

``torch.export.load`` hands every ``expr_str`` of the graph to
``sympy.sympify``, which ``eval``-uates it as Python. A benign program only
ever holds what ``sympy.srepr`` prints for shape arithmetic, e.g.
``Mul(Integer(2), Symbol('s77', positive=True, integer=True))``, or the same
in infix form (``2*s77 + 1``). This parser accepts exactly that language and
nothing else, so no attribute access, subscript, lambda, string other than a
symbol name, or unknown call can reach ``eval``:

    expr   := arith (CMP arith)?
    arith  := term (("+" | "-") term)*
    term   := unary (("*" | "//" | "%") unary)*
    unary  := "-" unary | atom
    atom   := INT | SYMBOL | "True" | "False" | "(" expr ")"
            | "Integer(" "-"? INT ")"
            | "Symbol(" "'" SYMBOL "'" ("," FLAG "=" ("True" | "False"))* ")"
            | FUNC "(" expr ("," expr)* ")"

Parsing is not enough: torch *simplifies* what it sympifies (``FloorDiv.eval``
calls ``sympy.gcd``), and that work grows with the expanded polynomial, so
``FloorDiv((s1+s2)*(s3+s4)*..., s1+s3+1)`` with 20 factors expands to 2**20
terms and takes hours. The parser therefore also bounds what expansion can
cost: every sub-expression, multiplied out, has at most
:data:`MAX_TERMS` terms (a product multiplies its factors' term counts, a sum
adds them, a function call counts as one term but its arguments are bounded
in turn); an expression names at most :data:`MAX_SYMBOLS` distinct symbols
and nests at most :data:`MAX_DEPTH` deep. :data:`MAX_EXPRESSIONS` and
:data:`MAX_TOTAL_LENGTH` bound a whole program (counted by the schema check).
Real programs stay far inside: a dynamic conv stack writes
``FloorDiv(s0 - 1, 2) + 1``-style expressions of one or two symbols.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_EXPRESSIONS",
    "MAX_SYMBOLS",
    "MAX_TERMS",
    "MAX_TOTAL_LENGTH",
    "SYMBOL",
    "BadExpression",
    "check_sym_expr",
]

SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
MAX_LENGTH = 10_000
MAX_DEPTH = 64
MAX_TERMS = 64  # terms of any sub-expression once multiplied out
MAX_SYMBOLS = 16  # distinct symbols in one expression
MAX_EXPRESSIONS = 200_000  # expressions in one program
MAX_TOTAL_LENGTH = 8_000_000  # characters of all expressions of one program
_MAX_DIGITS = 30
_FUNCS = frozenset(
    {
        "Add",
        "Mul",
        "Min",
        "Max",
        "FloorDiv",
        "Mod",
        "PythonMod",
        "CleanDiv",
        "CeilDiv",
        "CeilToInt",
        "FloorToInt",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "Equality",
        "Unequality",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "And",
        "Or",
        "Not",
    }
)
# the assumptions export puts on a symbol (sympy.Symbol keyword arguments)
_FLAGS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite"})
_TOKEN = re.compile(r"\s*(?:(//|==|!=|<=|>=|[-+*%<>(),=])|([0-9]+)|([A-Za-z_][A-Za-z0-9_]*)|('[^']*'))")
_CMP = frozenset({"==", "!=", "<=", ">=", "<", ">"})


class BadExpression(ValueError):
    """The text is not in the grammar; the message says where."""


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip() == "":
                break
            raise BadExpression(f"unexpected character {text[pos]!r} at {pos}")
        out.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.symbols: set[str] = set()

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None:
            raise BadExpression("the expression ends too early")
        if expected is not None and token != expected:
            raise BadExpression(f"expected {expected!r}, found {token!r}")
        self.pos += 1
        return token

    def bounded(self, terms: int) -> int:
        if terms > MAX_TERMS:
            raise BadExpression(
                f"multiplies out to {terms} or more terms (at most {MAX_TERMS}); simplifying it "
                "would take sympy exponential time"
            )
        return terms

    def expr(self) -> int:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise BadExpression(f"nested deeper than {MAX_DEPTH}")
        terms = self.arith()
        if self.peek() in _CMP:
            self.take()
            self.arith()
            terms = 1
        self.depth -= 1
        return terms

    def arith(self) -> int:
        terms = self.term()
        while self.peek() in {"+", "-"}:
            self.take()
            terms = self.bounded(terms + self.term())
        return terms

    def term(self) -> int:
        terms = self.unary()
        while self.peek() in {"*", "//", "%"}:
            # a // b and a % b are FloorDiv / Mod calls: one opaque term, arguments bounded already
            operator = self.take()
            factor = self.unary()
            terms = self.bounded(terms * factor) if operator == "*" else 1
        return terms

    def unary(self) -> int:
        if self.peek() == "-":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise BadExpression(f"nested deeper than {MAX_DEPTH}")
            terms = self.unary()
            self.depth -= 1
            return terms
        return self.atom()

    def integer(self) -> None:
        token = self.take()
        if not token.isdigit() or len(token) > _MAX_DIGITS:
            raise BadExpression(f"expected an integer of at most {_MAX_DIGITS} digits, found {token[:40]!r}")

    def atom(self) -> int:
        token = self.peek()
        if token is None:
            raise BadExpression("the expression ends too early")
        if token.isdigit():
            self.integer()
        elif token == "(":
            self.take()
            terms = self.expr()
            self.take(")")
            return terms
        elif token in {"True", "False"}:
            self.take()
        elif token == "Integer":
            self.take()
            self.take("(")
            if self.peek() == "-":
                self.take()
            self.integer()
            self.take(")")
        elif token == "Symbol":
            self.symbol()
        elif token in _FUNCS:
            return self.call(self.take())
        elif SYMBOL.fullmatch(token):
            self.name(self.take())
        else:
            raise BadExpression(f"{token[:40]!r} is not a symbol, integer or shape function")
        return 1

    def call(self, func: str) -> int:
        self.take("(")
        counts = [self.expr()]
        while self.peek() == ",":
            self.take()
            counts.append(self.expr())
        self.take(")")
        if func == "Add":
            return self.bounded(sum(counts))
        if func == "Mul":
            product = 1
            for terms in counts:
                product = self.bounded(product * terms)
            return product
        return 1

    def name(self, symbol: str) -> None:
        self.symbols.add(symbol)
        if len(self.symbols) > MAX_SYMBOLS:
            raise BadExpression(f"names more than {MAX_SYMBOLS} distinct symbols")

    def symbol(self) -> None:
        self.take("Symbol")
        self.take("(")
        name = self.take()
        if not (name.startswith("'") and SYMBOL.fullmatch(name[1:-1])):
            raise BadExpression(f"Symbol() names {name[:40]!r}, not a shape symbol like 's0'")
        self.name(name[1:-1])
        while self.peek() == ",":
            self.take()
            flag = self.take()
            if flag not in _FLAGS:
                raise BadExpression(f"Symbol() has the unknown keyword {flag[:40]!r}")
            self.take("=")
            if self.take() not in {"True", "False"}:
                raise BadExpression("a Symbol() keyword must be True or False")
        self.take(")")


def check_sym_expr(text: str) -> None:
    """Raise :class:`BadExpression` unless ``text`` is plain shape arithmetic (see the module docstring)."""
    if len(text) > MAX_LENGTH:
        raise BadExpression(f"{len(text)} characters, more than the {MAX_LENGTH} allowed")
    parser = _Parser(_tokens(text))
    parser.expr()
    if parser.peek() is not None:
        raise BadExpression(f"unexpected {parser.peek()!r} after the expression")
