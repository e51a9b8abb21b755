"""Compile options: their declarations and the checks for their values.

A pass or a target declares the ``lorafx.compile`` options it takes as a class
attribute ``options = (Option("r", int, 8, "LoRA rank", check=check_positive_int), ...)``;
``compile()`` validates against the union of those declarations (``check_options``)
and builds each pass from them.

Each check raises naming the option, the bad value and the fix: TypeError for a value
of the wrong type, ValueError for a bad value (out of range, a broken regex, not one of
the choices).  ``where`` prefixes the message (e.g. ``"InsertLoRA: "``).  Numbers may be
numpy scalars; bools are not numbers here.
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Option", "check_options", "unknown_options_error", "options_table", "check_bool", "check_positive_int", "check_positive_real", "check_probability", "check_choice",
           "check_seed", "check_modules", "check_pattern_dict", "regex_error"]


def _got(value: Any) -> str:
    kind = "string" if isinstance(value, str) else type(value).__name__
    return f"got {value!r} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def check_bool(name: str, value: Any, where: str = "") -> None:
    if not isinstance(value, bool):
        quotes = ", without quotes" if isinstance(value, str) else ""
        raise TypeError(f"{where}{name} must be True or False, {_got(value)}; pass {name}=True or {name}=False{quotes}")


def check_positive_int(name: str, value: Any, where: str = "", example: str = "8") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}{name} must be a positive int, {_got(value)}; pass e.g. {name}={example}")
    if value <= 0:
        raise ValueError(f"{where}{name} must be a positive int, got {value!r}; pass e.g. {name}={example}")


def check_positive_real(name: str, value: Any, where: str = "", why: str = "") -> None:
    """A finite number > 0 (``why``, if given, says what a bad value would do)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a number > 0, {_got(value)}; pass e.g. {name}=16")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}{name} must be a finite number > 0, got {value!r}{why}; pass e.g. {name}=16")


def check_probability(name: str, value: Any, where: str = "") -> None:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a number in [0, 1), {_got(value)}; pass e.g. {name}=0.05")
    if not 0 <= value < 1:
        raise ValueError(f"{where}{name} must be in [0, 1), got {value!r}; pass e.g. {name}=0.05 (0: no dropout)")


def check_choice(name: str, value: Any, choices: Sequence[str], where: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}unknown {name} {value!r}; choose one of {tuple(choices)}")


def check_seed(name: str, value: Any, where: str = "") -> None:
    """None or an int that fits torch's 64-bit seed."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}{name} must be an int or None, {_got(value)}; pass e.g. {name}=0")
    if not -2**63 <= value < 2**64:
        raise ValueError(f"{where}{name}={value!r} does not fit in 64 bits; pass a smaller int, e.g. {name}=0")


def regex_error(pattern: str) -> Optional[str]:
    """Why ``pattern`` is not a valid regex, or None."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


def check_modules(name: str, value: Any, where: str = "", allow_none: bool = False) -> None:
    """A regex string, or a list/tuple (or set) of module names."""
    if value is None and allow_none:
        return
    fix = f"pass a regex string or a list of module names, e.g. {name}=['q_proj', 'v_proj']"
    if isinstance(value, str):
        err = regex_error(value)
        if err:
            raise ValueError(f"{where}{name}={value!r} is not a valid regex ({err}); {fix}, "
                             "or escape special characters with re.escape")
        return
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{where}{name} must be a string or a list of strings, {_got(value)}; {fix}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{where}{name} must hold module names (strings), but holds {item!r}; {fix}")


def check_pattern_dict(name: str, value: Any, check_value: Callable[[str, Any, str], None], where: str = "",
                       example: str = "{'q_proj': 16}") -> None:
    """A dict {regex: value}; each key is matched against the end of module names."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}{name} must be a dict {{regex: value}}, {_got(value)}; pass e.g. {name}={example}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}{name} keys must be regex strings, {_got(key)}; pass e.g. {name}={example}")
        err = regex_error(key)
        if err is None and regex_error(rf"(.*\.)?(?:{key})$"):  # how the keys are matched
            err = "keys are matched as (.*\\.)?(?:KEY)$, so inline flags such as (?i) cannot be used"
        if err:
            raise ValueError(f"{where}{name} key {key!r} is not a valid regex ({err}); "
                             "escape special characters with re.escape, or use a plain module name")
        check_value(f"{name}[{key!r}]", item, where)


# -- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A ``lorafx.compile`` option that a pass or target declares.

    ``name``: the compile keyword; ``type`` and ``help``: for the docs; ``default``: the
    value when the option is not given (``default_text`` shows a default that depends on
    other settings).  ``field``: the pass or target field it sets (default: ``name``).
    ``enables=True``: the option only switches its pass on or off (``fold_a``).
    ``check(name, value, where)`` raises TypeError/ValueError for a bad value; without
    one, a bool option is checked with ``check_bool`` and the rest by the pass's own
    ``validate`` when compile builds it (both before capture).
    """

    name: str
    type: Any
    default: Any
    help: str
    field: Optional[str] = None
    enables: bool = False
    check: Optional[Callable[[str, Any, str], None]] = None
    default_text: Optional[str] = None

    @property
    def target_field(self) -> str:
        return self.field or self.name

    def validate(self, value: Any, where: str = "") -> None:
        if self.check is not None:
            self.check(self.name, value, where)
        elif self.type is bool:
            check_bool(self.name, value, where)

    def type_name(self) -> str:
        kinds = self.type if isinstance(self.type, tuple) else (self.type,)
        return " | ".join(k if isinstance(k, str) else "None" if k is type(None) else k.__name__ for k in kinds)

    def shown_default(self) -> str:
        return self.default_text or repr(self.default)

    @property
    def peft_name(self) -> Optional[str]:
        """PEFT's LoraConfig name for this option where it differs (``alpha`` -> ``lora_alpha``), else None
        (the alias table is ``lorafx.peft_names.ALIASES``)."""
        from .peft_names import peft_name
        return peft_name(self.name)


Declarations = Sequence[Tuple[str, Sequence[Option]]]  # (owner, its options), e.g. ("InsertLoRA", (...))


def unknown_options_error(unknown: Sequence[str], declarations: Declarations, builtin: Sequence[str] = (),
                          where: str = "lorafx.compile") -> TypeError:
    """The TypeError for unknown option names: close matches, then what each owner declares."""
    known = [o.name for _, opts in declarations for o in opts] + list(builtin)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if close:
            hints.append(f"{name!r}: did you mean {' or '.join(map(repr, close))}?")
    owners = [f"{owner} ({', '.join(repr(o.name) for o in opts) or 'none'})" for owner, opts in declarations]
    if builtin:
        owners.append(f"compile itself ({', '.join(map(repr, builtin))})")
    return TypeError(f"{where} got unknown option(s) {sorted(unknown)}"
                     + (f" ({'; '.join(hints)})" if hints else "")
                     + f"; known options, by who declares them: {'; '.join(owners)}")


def check_options(values: Mapping, declarations: Declarations, builtin: Sequence[str] = (),
                  where: str = "lorafx.compile") -> None:
    """Refuse unknown option names, then check every given value against its declaration."""
    declared: Dict[str, List[Option]] = {}
    for _, opts in declarations:
        for o in opts:
            declared.setdefault(o.name, []).append(o)
    unknown = [k for k in values if k not in declared]
    if unknown:
        raise unknown_options_error(unknown, declarations, builtin, where)
    for name, value in values.items():
        for o in declared[name]:
            o.validate(value, f"{where}: ")


def options_table(declarations: Declarations) -> str:
    """A markdown table of the declared options (the README's table of compile options); an
    option PEFT's LoraConfig names otherwise shows that name too (``lorafx.peft_names``)."""
    cell = lambda text: str(text).replace("|", "\\|")
    lines = ["| option | type | default | declared by | meaning |", "|---|---|---|---|---|"]
    for owner, opts in declarations:
        for o in opts:
            alias = o.peft_name
            name = f"`{o.name}` (PEFT: `{alias}`)" if alias else f"`{o.name}`"
            lines.append(f"| {name} | {cell(o.type_name())} | `{cell(o.shown_default())}` | {owner} "
                         f"| {cell(o.help)} |")
    return "\n".join(lines)
