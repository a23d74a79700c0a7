"""The search-space grammar of sweep.py and its mapping to Optuna distributions and to script flags.

    SPACE  := PARAM (whitespace PARAM)*
    PARAM  := NAME '=' KIND '(' ARGS ')'            NAME is a flag without its dashes (lr, lora_r, fine-tune-mode)
    KIND   := uniform(low, high)                    a float in [low, high]
            | loguniform(low, high)                 a float, sampled uniformly in log space (low > 0)
            | int(low, high[, step])                an integer in [low, high] (inclusive), every `step`
            | choice(v1, v2, ...)                   one of the values: numbers, true/false, strings
                                                    (bare words or quoted)

    'lr=loguniform(1e-5,1e-3) batch_size=choice(8,16,32) lora_r=choice(4,8,16)'

A value becomes `--NAME VALUE`; a choice of true/false is a switch (`--NAME` present or absent).
Grid search takes every combination of `choice` values and `int` ranges; `uniform` and
`loguniform` have no grid.  Errors are `ConfigError("space", ...)` naming the parameter.
"""
from __future__ import annotations

import itertools
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

KINDS = ("uniform", "loguniform", "int", "choice")
_PARAM = re.compile(r"\s*([A-Za-z_][\w-]*)\s*=\s*([a-z]+)\s*\(([^()]*)\)\s*")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    args: tuple

    def distribution(self):
        """The Optuna distribution of this parameter."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "uniform":
            return FloatDistribution(*self.args)
        if self.kind == "loguniform":
            return FloatDistribution(*self.args, log=True)
        if self.kind == "int":
            low, high, step = self.args
            return IntDistribution(low, high, step=step)
        return CategoricalDistribution(self.args)

    def grid(self) -> list:
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "int":
            low, high, step = self.args
            return list(range(low, high + 1, step))
        raise ConfigError("space", f"{self.name}={self.kind}(...) has no grid; give the grid sampler choice(...) or "
                          f"int(...) values, or use the tpe or random sampler")

    def __str__(self) -> str:
        shown = ", ".join(_show(a) for a in (self.args if self.kind != "int" or self.args[2] != 1 else self.args[:2]))
        return f"{self.name}={self.kind}({shown})"


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[\w.:/+-]+", value):
        return repr(value)
    return str(value)


def _value(text: str, name: str):
    """A choice value: int, float, bool, or string (quotes removed)."""
    text = text.strip()
    if not text:
        raise ConfigError("space", f"{name}: an empty value")
    if text[0] in "'\"":
        try:
            parts = shlex.split(text)
        except ValueError as exc:
            raise ConfigError("space", f"{name}: {text}: {exc}") from None
        if len(parts) != 1:
            raise ConfigError("space", f"{name}: {text}: one quoted value expected")
        return parts[0]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _float(text: str, name: str) -> float:
    value = _value(text, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError("space", f"{name}: {text.strip()!r} is not a finite number")
    return float(value)


def _split_args(body: str) -> list[str]:
    """Comma-separated arguments; commas inside quotes stay."""
    if not body.strip():
        return []
    parts, current, quote = [], "", None
    for ch in body:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            parts.append(current)
            current = ""
            continue
        current += ch
    return parts + [current]


def parse_param(name: str, kind: str, body: str) -> Param:
    parts = _split_args(body)
    if kind not in KINDS:
        raise ConfigError("space", f"{name}={kind}(...): unknown kind; use one of {', '.join(KINDS)}")
    if kind == "choice":
        values = tuple(_value(p, name) for p in parts)
        if not values:
            raise ConfigError("space", f"{name}=choice(): give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError("space", f"{name}=choice({body}): a value is repeated")
        return Param(name, kind, values)
    if kind in ("uniform", "loguniform"):
        if len(parts) != 2:
            raise ConfigError("space", f"{name}={kind}({body}): give low, high")
        low, high = (_float(p, name) for p in parts)
        if not low < high:
            raise ConfigError("space", f"{name}={kind}({body}): low must be < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError("space", f"{name}=loguniform({body}): low must be > 0")
        return Param(name, kind, (low, high))
    if len(parts) not in (2, 3):
        raise ConfigError("space", f"{name}=int({body}): give low, high[, step]")
    ints = [_value(p, name) for p in parts]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        raise ConfigError("space", f"{name}=int({body}): integers expected")
    low, high, step = (*ints, 1) if len(ints) == 2 else ints
    if not low <= high or step < 1 or (high - low) % step:
        raise ConfigError("space", f"{name}=int({body}): need low <= high, step >= 1 and high - low a multiple of step")
    return Param(name, kind, (low, high, step))


def parse_space(text: str) -> dict[str, Param]:
    """`--space` text -> {name: Param}, in the order given."""
    out: dict[str, Param] = {}
    pos = 0
    text = text.strip()
    if not text:
        raise ConfigError("space", "is empty; give e.g. 'lr=loguniform(1e-5,1e-3) batch_size=choice(8,16)'")
    while pos < len(text):
        m = _PARAM.match(text, pos)
        if not m:
            raise ConfigError("space", f"cannot read {text[pos:][:40]!r}: expected NAME=KIND(ARGS) with KIND one of "
                              f"{', '.join(KINDS)}")
        name, kind, body = m.groups()
        if name in out:
            raise ConfigError("space", f"{name} is given twice")
        out[name] = parse_param(name, kind, body)
        pos = m.end()
    return out


def grid(space: dict[str, Param]) -> dict[str, list]:
    return {name: p.grid() for name, p in space.items()}


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(v) for v in grid(space).values())


def grid_points(space: dict[str, Param]) -> list[dict[str, Any]]:
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*grid(space).values())]


def flags_for(params: dict[str, Any]) -> list[str]:
    """Script flags of one trial's parameter values."""
    out: list[str] = []
    for name, value in params.items():
        if isinstance(value, bool):
            out += [f"--{name}"] if value else []
        else:
            out += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return out
