"""The text form of segment rules: `parse(text) -> Rule` and `format_rule(rule) -> text`.

    computed.frequency >= 3 AND event("order").count(last 90d) >= 1 AND NOT segment("vip")
    traits.plan IN ["pro", "team"] OR (traits.age BETWEEN 18 AND 30 AND traits.email EXISTS)
    event("order", category = "books").sum(amount, from 1997-01-01T00:00:00Z to 1997-04-01T00:00:00Z) > 100
    score("models/churn-90d") >= 0.7 AND score("churn-90d").percentile >= 90
    traits."会员等级" = "金卡" AND traits."Plan Name" = "pro" AND event("order", "商品 类别" = "书").count(last 30d) > 0

NOT binds tighter than AND, AND tighter than OR. The canonical text (what `format_rule` writes)
upper-cases keywords, writes times in UTC with `Z`, numbers without a needless `.0`, and puts a group
inside another group in parentheses, so `parse(format_rule(rule)) == rule` for every rule
`rules.validate` accepts and `format_rule(parse(text)) == text` for canonical text. Plain names
(`rules.NAME`: ASCII letters, digits, _ and -, dotted parts not starting with a digit) are written as
they are; every other trait name (`traits."Plan Name"`, the quoted part right after the dot) and property
name (`"unit price"`, and a property named after a keyword: `"in"`) is written as a JSON string, like
values; the canonical text quotes exactly the names that are not plain. A bare model id in `score(...)`
means `models/<id>`; the canonical text writes the name. Parentheses and NOTs nest at most
MAX_RULE_DEPTH deep, which every valid rule's text respects.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from services.segmentation.rules import (
    KEYWORDS,
    MAX_NUMBER,
    MAX_RULE_DEPTH,
    NAME,
    NAME_PATTERN,
    Aggregation,
    AllOf,
    AnyOf,
    Comparison,
    Condition,
    EventAggregateCondition,
    EventCountCondition,
    FixedRange,
    LastDays,
    Not,
    Operator,
    PropertyFilter,
    Rule,
    Scalar,
    ScoreCondition,
    ScoreField,
    SegmentCondition,
    TraitCondition,
    Window,
    beyond_safe_integers,
    parse_time,
    segment_id_of_reference,
)


class RuleSyntaxError(Exception):
    """Text that is not a rule; `position` is the 0-based offset of the offending character."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"at character {position + 1}: {message}")
        self.message = message
        self.position = position


@dataclass(frozen=True)
class Token:
    kind: str  # STRING NUMBER TIME DAYS NAME OP PUNCT END
    text: str
    position: int


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<STRING>"(?:[^"\\]|\\.)*")
  | (?P<TIME>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2}))?)
  | (?P<DAYS>\d+d\b)
  | (?P<NUMBER>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<NAME>""" + NAME_PATTERN + r""")
  | (?P<OP>!=|<=|>=|=|<|>)
  | (?P<PUNCT>[()\[\],.])
""", re.VERBOSE)
_FUNCTIONS = {"event", "score", "segment"}
# Characters that end a name in a text, for the example an unexpected character's error gives.
_NAME_END = re.compile(r"""[\s()\[\],=!<>"]""")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise RuleSyntaxError(_unexpected(text, position), position)
        kind = match.lastgroup or ""
        if kind != "space":
            value = match.group()
            if kind == "NAME" and value.upper() in KEYWORDS:
                kind, value = "KEYWORD", value.upper()
            tokens.append(Token(kind, value, position))
        position = match.end()
    tokens.append(Token("END", "", len(text)))
    return tokens


def _unexpected(text: str, position: int) -> str:
    """Why the character at `position` starts no token; for a letter outside ASCII (a name that needs quoting,
    like 会员等级) with the quoted spelling of the name it is part of."""
    char = text[position]
    message = f"unexpected character {char!r}"
    if char.isascii() or unicodedata.category(char)[0] not in "LMN":
        return message
    start = end = position
    while start > 0 and not _NAME_END.match(text, start - 1):
        start -= 1
    while end < len(text) and not _NAME_END.match(text, end):
        end += 1
    head, dot, name = text[start:end].partition(".")
    example = (f"{head}.{_quoted(name)}" if dot and name and NAME.fullmatch(head) else _quoted(text[start:end]))
    return (f"{message}: a name with characters other than ASCII letters, digits, _ and - is written quoted, "
            f"e.g. {example}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.index = 0
        self.depth = 0  # parentheses and NOTs open around the current token

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def ahead(self, count: int) -> int:
        """The position of the token `count` tokens after the current one (the end when there is none)."""
        return self.tokens[min(self.index + count, len(self.tokens) - 1)].position

    def take(self) -> Token:
        token = self.current
        self.index += 1
        return token

    def at(self, kind: str, text: str | None = None) -> bool:
        return self.current.kind == kind and (text is None or self.current.text == text)

    def expect(self, kind: str, text: str | None = None, what: str | None = None) -> Token:
        if not self.at(kind, text):
            wanted = what or (repr(text) if text else kind.lower())
            found = repr(self.word()) if self.current.kind != "END" else "the end of the rule"
            raise RuleSyntaxError(f"expected {wanted}, found {found}", self.current.position)
        return self.take()

    def word(self) -> str:
        """The current token with the tokens written right after it (`30x` is NUMBER 30 and NAME x): what the reader
        wrote there, for an error to quote."""
        start = self.current.position
        end = start + len(self.current.text)
        for token in self.tokens[self.index + 1:]:
            if token.kind == "END" or token.position != end or token.kind in ("PUNCT", "OP"):
                break
            end = token.position + len(token.text)
        return self.text[start:end]

    def rule(self) -> Rule:
        rule = self.any_of()
        self.expect("END", what="AND, OR or the end of the rule")
        return rule

    def any_of(self) -> Rule:
        start = self.current.position
        rules = [self.all_of()]
        while self.at("KEYWORD", "OR"):
            self.take()
            rules.append(self.all_of())
        return rules[0] if len(rules) == 1 else AnyOf(tuple(rules), position=start)

    def all_of(self) -> Rule:
        start = self.current.position
        rules = [self.unary()]
        while self.at("KEYWORD", "AND"):
            self.take()
            rules.append(self.unary())
        return rules[0] if len(rules) == 1 else AllOf(tuple(rules), position=start)

    def unary(self) -> Rule:
        if self.at("KEYWORD", "NOT"):
            start = self.nest().position
            rule: Rule = Not(self.unary(), position=start)
            self.depth -= 1
            return rule
        if self.at("PUNCT", "("):
            self.nest()
            rule = self.any_of()
            self.expect("PUNCT", ")")
            self.depth -= 1
            return rule
        return self.condition()

    def nest(self) -> Token:
        """Takes a NOT or a '(', refusing nesting deeper than a valid rule's: a rule validation accepts prints
        with at most MAX_RULE_DEPTH of them open at once, and the parser's recursion stays bounded."""
        if self.depth == MAX_RULE_DEPTH:
            raise RuleSyntaxError(f"parentheses and NOTs nest at most {MAX_RULE_DEPTH} levels deep",
                                  self.current.position)
        self.depth += 1
        return self.take()

    def condition(self) -> Condition:
        token = self.expect("NAME", what="a condition (traits.<name>, computed.<name>, event(...), score(...), "
                                         "segment(...)), NOT or '('")
        if token.text in _FUNCTIONS and self.at("PUNCT", "("):
            self.take()
            if token.text == "segment":
                parts = {"segment": self.current.position}
                segment_id = segment_id_of_reference(self.string())
                self.expect("PUNCT", ")")
                return SegmentCondition(segment_id, position=token.position, parts=parts)
            if token.text == "score":
                return self.score(token.position)
            return self.event(token.position)
        parts = {}
        return TraitCondition(self.field(token), self.comparison(parts), position=token.position, parts=parts)

    def field(self, head: Token) -> str:
        """The field a condition starting with the name `head` compares: `traits.plan` is one name token;
        `traits."Plan Name"` is the name, a dot and a string, written without spaces between them."""
        if not (self.at("PUNCT", ".") and self.tokens[self.index + 1].kind == "STRING"):
            return head.text
        dot = self.take()
        quoted = self.take()
        if dot.position != head.position + len(head.text) or quoted.position != dot.position + 1:
            raise RuleSyntaxError(f"write a quoted name right after its dot, without spaces: {head.text}."
                                  f"{quoted.text}", dot.position)
        return f"{head.text}.{_string_of(quoted)}"

    def property_name(self, what: str) -> Token:
        """A property name: a plain name, or any name quoted (a keyword's too); its text is the name."""
        if self.at("STRING"):
            token = self.take()
            return Token("NAME", _string_of(token), token.position)
        if self.at("KEYWORD"):
            written = self.text[self.current.position:self.current.position + len(self.current.text)]
            raise RuleSyntaxError(f"expected {what}, found the keyword {written!r}: a property of that name is "
                                  f"written quoted, {_quoted(written)}", self.current.position)
        return self.expect("NAME", what=what)

    def score(self, start: int) -> ScoreCondition:
        parts = {"model": self.current.position}
        model = self.string()
        self.expect("PUNCT", ")")
        score_field = ScoreField.PROBABILITY
        if self.at("PUNCT", "."):
            self.take()
            name = self.expect("NAME", what="probability or percentile")
            if name.text not in ScoreField.__members__.values():
                raise RuleSyntaxError(f"a score has a probability or a percentile, not {name.text!r}", name.position)
            score_field = ScoreField(name.text)
        return ScoreCondition(model, score_field, self.comparison(parts), position=start, parts=parts)

    def event(self, start: int) -> EventCountCondition | EventAggregateCondition:
        parts = {"event_name": self.current.position}
        event_name = self.string()
        filters: list[PropertyFilter] = []
        while self.at("PUNCT", ","):
            self.take()
            name = self.property_name("a property name")
            prefix = f"filters[{len(filters)}]"
            parts[prefix] = parts[f"{prefix}.property"] = name.position
            filters.append(PropertyFilter(name.text, self.comparison(parts, f"{prefix}.")))
        self.expect("PUNCT", ")")
        self.expect("PUNCT", ".")
        function = self.expect("NAME", what="count, sum, avg, min or max")
        self.expect("PUNCT", "(")
        if function.text == "count":
            window = self.window(parts)
            self.expect("PUNCT", ")")
            return EventCountCondition(event_name, tuple(filters), window, self.comparison(parts), position=start,
                                       parts=parts)
        if function.text not in {a.value for a in Aggregation}:
            raise RuleSyntaxError(f"expected count, sum, avg, min or max, found {function.text!r}", function.position)
        prop = self.property_name("the property to aggregate")
        parts["property"] = prop.position
        self.expect("PUNCT", ",")
        window = self.window(parts)
        self.expect("PUNCT", ")")
        return EventAggregateCondition(event_name, prop.text, Aggregation(function.text), tuple(filters), window,
                                       self.comparison(parts), position=start, parts=parts)

    def window(self, parts: dict[str, int]) -> Window:
        token = self.expect("NAME", what="a window: last <N>d or from <time> to <time>")
        parts["window"] = token.position
        if token.text == "last":
            days = self.expect("DAYS", what="a number of days like 90d")
            parts["window.last_days"] = days.position
            return LastDays(int(days.text[:-1]))
        if token.text == "from":
            parts["window.between.start_time"] = self.current.position
            start = self.time()
            self.expect("NAME", "to")
            parts["window.between.end_time"] = self.current.position
            return FixedRange(start, self.time())
        raise RuleSyntaxError(f"expected a window (last <N>d or from <time> to <time>), found {token.text!r}",
                              token.position)

    def time(self) -> datetime:
        token = self.expect("TIME", what="a time like 1997-01-01T00:00:00Z")
        value = parse_time(token.text)
        if value is None:
            raise RuleSyntaxError(f"{token.text!r} is not a valid time", token.position)
        try:
            return value.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00:00-02:00 is in the year 10000 in UTC
            raise RuleSyntaxError(f"{token.text!r} is not in the years 1-9999 in UTC", token.position) from None

    def comparison(self, parts: dict[str, int], prefix: str = "") -> Comparison:
        """A comparison; records where its operator and operands start in `parts` (under `prefix`), by the
        proto field names validation reports them with."""
        token = self.current
        parts[f"{prefix}operator"] = token.position
        # `op v`, `IN [v, ...]`, `BETWEEN low AND high`: how many tokens after the operator the operands start
        first = self.ahead(2 if token.text == "IN" else 1)
        second = self.ahead(3) if token.text == "BETWEEN" else first
        for name in ("value", "values", "count"):
            parts[f"{prefix}{name}"] = first
        for name in ("value_upper", "count_upper"):
            parts[f"{prefix}{name}"] = second
        if token.kind == "OP":
            self.take()
            return Comparison(Operator(token.text), (self.value(),))
        if token.kind == "KEYWORD" and token.text == "EXISTS":
            self.take()
            return Comparison(Operator.EXISTS)
        if token.kind == "KEYWORD" and token.text == "CONTAINS":
            self.take()
            return Comparison(Operator.CONTAINS, (self.value(),))
        if token.kind == "KEYWORD" and token.text == "BETWEEN":
            self.take()
            low = self.value()
            self.expect("KEYWORD", "AND")
            return Comparison(Operator.BETWEEN, (low, self.value()))
        if token.kind == "KEYWORD" and token.text == "IN":
            self.take()
            self.expect("PUNCT", "[")
            values = [self.value()]
            while self.at("PUNCT", ","):
                self.take()
                values.append(self.value())
            self.expect("PUNCT", "]")
            return Comparison(Operator.IN, tuple(values))
        found = repr(token.text) if token.kind != "END" else "the end of the rule"
        # `traits.Plan Name = 1`: the second word of a name with a space ends up here.
        hint = (" (a name with spaces or other characters outside A-Z, a-z, 0-9, _ and - is written quoted, "
                "e.g. traits.\"Plan Name\")" if token.kind == "NAME" else "")
        raise RuleSyntaxError(f"expected an operator (=, !=, <, <=, >, >=, IN, CONTAINS, EXISTS, BETWEEN), "
                              f"found {found}{hint}", token.position)

    def value(self) -> Scalar:
        token = self.take()
        if token.kind == "STRING":
            return _string_of(token)
        if token.kind == "NUMBER":
            number = float(token.text)
            # Validation refuses a number past MAX_NUMBER; the only ones a double rounds to within it are
            # written a fraction past it (9007199254740991.2), and only their text says so.
            if abs(number) == MAX_NUMBER and abs(Decimal(token.text)) > MAX_NUMBER:
                raise RuleSyntaxError(beyond_safe_integers(Decimal(token.text)), token.position)
            return number
        if token.kind == "NAME" and token.text in ("true", "false"):
            return token.text == "true"
        if token.kind == "TIME":
            raise RuleSyntaxError(f"quote times compared with traits: \"{token.text}\"", token.position)
        found = repr(token.text) if token.kind != "END" else "the end of the rule"
        raise RuleSyntaxError(f"expected a value (\"text\", a number, true or false), found {found}", token.position)

    def string(self) -> str:
        return _string_of(self.expect("STRING", what="a quoted name"))


def _string_of(token: Token) -> str:
    """The text of a STRING token: a JSON string that is UTF-8 text (what a proto string and the stored rule
    can hold)."""
    try:
        text: str = json.loads(token.text)
        text.encode()
    except json.JSONDecodeError as error:
        raise RuleSyntaxError(f"not a valid string ({error.msg.removesuffix(' at').lower()}; strings are "
                              "written as in JSON)",
                              token.position + error.pos) from None
    except UnicodeEncodeError:
        raise RuleSyntaxError("not a valid string: a \\u escape of a lone surrogate is not text",
                              token.position) from None
    return text


def parse(text: str) -> Rule:
    """The rule a text describes; RuleSyntaxError with the position of the first error."""
    return _Parser(text).rule()


# ---- formatting -----------------------------------------------------------------------------------

def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def format_field(field: str) -> str:
    """`traits.plan`, or with the name quoted when it is not plain: `traits."Plan Name"`."""
    head, dot, name = field.partition(".")
    return f"{head}.{_quoted(name)}" if dot and not NAME.fullmatch(name) else field


def format_property(name: str) -> str:
    """A property name as written in the text: plain, or quoted (not plain, or a keyword)."""
    return name if NAME.fullmatch(name) and name.upper() not in KEYWORDS else _quoted(name)


def format_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quoted(value)
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def format_time(value: datetime) -> str:
    utc = value.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else ""
    # The year explicitly in four digits: strftime's %Y does not pad years before 1000 on every platform.
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S}{fraction}Z"


def format_comparison(subject: str, comparison: Comparison) -> str:
    operator, operands = comparison.operator, comparison.operands
    if operator is Operator.EXISTS:
        return f"{subject} EXISTS"
    if operator is Operator.IN:
        return f"{subject} IN [{', '.join(format_value(v) for v in operands)}]"
    if operator is Operator.BETWEEN:
        return f"{subject} BETWEEN {format_value(operands[0])} AND {format_value(operands[1])}"
    return f"{subject} {operator.value} {format_value(operands[0])}"


def format_window(window: Window) -> str:
    if isinstance(window, LastDays):
        return f"last {window.days}d"
    return f"from {format_time(window.start)} to {format_time(window.end)}"


def format_condition(condition: Condition) -> str:
    if isinstance(condition, TraitCondition):
        return format_comparison(format_field(condition.field), condition.comparison)
    if isinstance(condition, SegmentCondition):
        return f"segment({format_value(condition.segment_id)})"
    if isinstance(condition, ScoreCondition):
        suffix = ".percentile" if condition.score_field is ScoreField.PERCENTILE else ""
        return format_comparison(f"score({format_value(condition.model)}){suffix}", condition.comparison)
    filters = "".join(f", {format_comparison(format_property(f.property), f.comparison)}" for f in condition.filters)
    head = f"event({format_value(condition.event_name)}{filters})"
    if isinstance(condition, EventCountCondition):
        return format_comparison(f"{head}.count({format_window(condition.window)})", condition.comparison)
    return format_comparison(
        f"{head}.{condition.aggregation.value}({format_property(condition.property)}, "
        f"{format_window(condition.window)})",
        condition.comparison)


def format_rule(rule: Rule) -> str:
    """The canonical text of a rule."""
    if isinstance(rule, AllOf | AnyOf):
        joiner = " AND " if isinstance(rule, AllOf) else " OR "
        return joiner.join(_nested(child) for child in rule.rules)
    if isinstance(rule, Not):
        return f"NOT {_nested(rule.rule)}"
    return format_condition(rule)


def _nested(rule: Rule) -> str:
    text = format_rule(rule)
    return f"({text})" if isinstance(rule, AllOf | AnyOf) and len(rule.rules) > 1 else text
