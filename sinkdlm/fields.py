"""Settings dataclasses: allowed values declared once, and command-line options built from the fields.

A field's allowed values are its `Literal[...]` type, read both by `check_choices` (the dataclass's
own check, whatever built it: YAML, Python or a flag) and by `add_arguments` (argparse's choices).
A field's help is its metadata (`setting(default, "help")`), and so is a number's allowed range
(`setting(2e-4, "peak learning rate", above=0)`), checked by `check_choices` too, which also refuses
NaN and infinity in every float field. So a flag's type, default, allowed values and help all come
from the one field, instead of being declared again in each command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from sinkdlm.errors import UserError

HELP = "help"  # the metadata key of a field's help text
UNSET = "unset"  # ... and of what a None value means
RANGE = "range"  # ... and of the numbers it allows (a Range, or None: any finite number)


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field allows: from `low` up to `high`, either end absent (unbounded) or open
    (the end itself excluded). A list field's items must each lie in it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above_low = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below_high = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above_low and below_high

    def __str__(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)'."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def setting(default: Any, help: str, unset: str | None = None, *, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with its help text (shown by --help), for a field that may be None what None
    means ("one block"), and for a number its range: at_least / above (the low end, included /
    excluded), at_most / below (the high end). A list default is copied for each instance."""
    if (at_least is not None and above is not None) or (at_most is not None and below is not None):
        raise TypeError("give each end of a range once: at_least or above, at_most or below")
    low = above if above is not None else at_least
    high = below if below is not None else at_most
    bounds = Range(low, high, above is not None, below is not None) if (low, high) != (None, None) else None
    metadata = {HELP: help, UNSET: unset, RANGE: bounds}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def range_of(f: dataclasses.Field) -> Range | None:
    """The Range a field declares (`setting(..., at_least=1)`), else None."""
    return f.metadata.get(RANGE)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved type hint (annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def without_none(hint: Any) -> Any:
    """`X | None` -> X; any other hint unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` type (also inside `| None`), else None."""
    hint = without_none(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def type_name(hint: Any) -> str:
    """A type as a user would write its values: int, float | None, fast|reference|eager, list[str]."""
    allowed = choices_of(hint)
    if allowed is not None:
        return "|".join(str(v) for v in allowed) + (" | None" if hint is not without_none(hint) else "")
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_allowed(value: Any, hint: Any, where: str) -> None:
    """A UserError ("model.attn_impl='x' is not one of [...]") when a Literal type does not allow `value`."""
    allowed = choices_of(hint)
    if allowed is not None and value not in allowed and not (value is None and hint is not without_none(hint)):
        raise UserError(f"{where}={value!r} is not one of {list(allowed)}")


def holds_floats(hint: Any) -> bool:
    """Whether a field's values are floats: float, float | None, Sequence[float]."""
    base = without_none(hint)
    return base is float or float in typing.get_args(base)


def check_number(value: Any, hint: Any, bounds: Range | None, where: str) -> None:
    """A UserError ("optim.lr=-1.0 must be a finite number > 0") when a number, or an item of a list of
    numbers, is NaN, infinite or outside `bounds`; other values (None, strings) pass."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
    shown, each = (f"{where}={items}", " each") if isinstance(value, (list, tuple)) else (f"{where}={value!r}", "")
    wanted = " ".join((["a finite number"] if holds_floats(hint) else []) + ([str(bounds)] if bounds else []))
    for x in numbers:
        if not math.isfinite(x) or (bounds is not None and x not in bounds):
            raise UserError(f"{shown} must{each} be {wanted}")


def check_choices(settings: Any, where: str) -> None:
    """Every field of a settings dataclass: its Literal's values (check_allowed), and a number's range
    and finiteness (check_number); `where` prefixes the field names ("model.")."""
    hints = field_types(type(settings))
    for f in dataclasses.fields(settings):
        value, name = getattr(settings, f.name), f"{where}{f.name}"
        check_allowed(value, hints[f.name], name)
        check_number(value, hints[f.name], range_of(f), name)


# ---------------------------------------------------------------------------------------------
# command-line options


def comma_ints(text: str, refusal: str) -> list[int]:
    """At least one comma-separated integer in `text` (an option's value); else UserError(refusal)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(refusal)
    return values


def comma_list(item: type) -> Callable[[str], list[Any]]:
    """An argparse type: "0.25,0.5" -> [0.25, 0.5] with each item converted by `item`."""

    def parse(text: str) -> list[Any]:
        try:
            return [item(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} should be comma-separated {item.__name__} values, "
                                             f"e.g. {'0,3' if item is int else '0.25,0.5'}") from None

    parse.__name__ = f"comma-separated {item.__name__}"  # what argparse names in its error messages
    return parse


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default; a settings field needs one to become an option")


def _argument(hint: Any, default: Any, help_: str) -> tuple[str, dict[str, Any]]:
    """(option prefix, argparse keywords) of a field: a flag for a bool, choices for a Literal, a
    comma-separated list for a sequence, else the plain type."""
    base = without_none(hint)
    if base is bool:
        return ("--no-", dict(action="store_false", help=f"turn off {help_}")) if default else \
            ("--", dict(action="store_true", help=help_))
    kwargs: dict[str, Any] = dict(default=default, help=help_)
    allowed = choices_of(base)
    if allowed is not None:
        kwargs.update(choices=allowed, type=type(allowed[0]))
    elif typing.get_origin(base) in (list, tuple, Sequence):
        (item, *_) = typing.get_args(base)
        kwargs.update(type=comma_list(item), metavar="A,B,...")
    else:
        kwargs["type"] = base
    return "--", kwargs


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] | None = None,
                  overrides_preset: bool = False) -> list[str]:
    """One option per field of the settings dataclass `cls` (or of `names` only), named after the field
    (gen_length -> --gen-length), with its type, allowed values, default and help; returns the names.

    overrides_preset: each option changes a preset's value, so it defaults to None ("the preset's").
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    chosen = list(names) if names is not None else list(fields)
    hints = field_types(cls)
    for name in chosen:
        f = fields[name]
        if HELP not in f.metadata:
            raise TypeError(f"{cls.__name__}.{name} has no help; declare it with settings.setting(default, help)")
        default = None if overrides_preset else _default(f)
        help_ = f.metadata[HELP]
        if range_of(f) is not None:
            help_ += f"; must be {range_of(f)}"
        if overrides_preset:
            help_ += " (default: the preset's)"
        elif default is None:
            help_ += f" (default: {f.metadata[UNSET]})"
        prefix, kwargs = _argument(hints[name], default, help_)
        if overrides_preset and "action" in kwargs:
            kwargs.update(action="store_const", const=kwargs["action"] == "store_true", default=None)
        parser.add_argument(prefix + name.replace("_", "-"), dest=name, **kwargs)
    return chosen


def values_from(args: argparse.Namespace, names: Sequence[str] | type, given_only: bool = False) -> dict[str, Any]:
    """{name: value} of the options `add_arguments` declared (for `names`, or every field of a settings
    class); given_only drops those left at None."""
    if isinstance(names, type):
        names = [f.name for f in dataclasses.fields(names)]
    values = {name: getattr(args, name) for name in names}
    return {k: v for k, v in values.items() if v is not None} if given_only else values


# ---------------------------------------------------------------------------------------------
# parsers


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: the value, "off" for a flag; an option whose default is
    None, or that words its default itself, says "default: ..." in its own help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text  # the help says what the default is, or there is none
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: {_shown(action.default)})"


def _shown(default: Any) -> str:
    """A default as it would be typed: a list as comma-separated values, [] as none."""
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default) or "none"
    return str(default).replace("%", "%%")


OPTION_CUTOFF = 0.6  # difflib similarity below which a known option is not offered for a misspelled one


def _head_word(option: str) -> str:
    """The word an option is about: --block-length -> block, --no-progress -> progress."""
    words = option.lstrip("-").split("-")
    return words[1] if words[0] == "no" and len(words) > 1 else words[0]


def close_option(parser: argparse.ArgumentParser, wrong: str) -> str | None:
    """The option of `parser` closest to a misspelled one, if any is close. Among the close ones, one
    about the same thing comes first: a misremembered option keeps its head word and misnames the
    rest (--block-size means --block-length, though its letters are closer to --batch-size)."""
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(wrong, known, n=len(known), cutoff=OPTION_CUTOFF)
    same_head = [option for option in close if _head_word(option) == _head_word(wrong)]
    return (same_head or close or [None])[0]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows every default, and which names an unknown option, and the
    closest known one, in the usage of the command it was given to (argparse blames the top level
    when a nested command does not know an option)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if args is not None and not self._subparsers:
            self._check_options(list(args))
        return super().parse_known_args(args, namespace)

    def _check_options(self, args: list[str]) -> None:
        words = args[: args.index("--")] if "--" in args else args
        known = [s for action in self._actions for s in action.option_strings]
        for word in words:
            name = word.split("=", 1)[0]
            if not name.startswith("--") or any(s.startswith(name) for s in known):  # argparse takes prefixes
                continue
            near = close_option(self, name)
            self.error(f"unrecognized argument {name}; " +
                       (f"did you mean {near}?" if near else f"see `{self.prog} --help` for the options"))
