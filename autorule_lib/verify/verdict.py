"""The verdict contract (book/method.md §3): 1, 0, or unscored with a reason, parsed from a judge's answer.

An answer holding neither verdict is a 0 as in the original, with the reason ``no_verdict`` so it is
counted; a backend failure is unscored, never a 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

YES, NO = "[[Yes]]", "[[No]]"
OUTPUT_CLIP = 400  # characters of judge output kept with a verdict (enough to see why it failed to parse)


# ---------------------------------------------------------------- verdicts

@dataclass
class Verdict:
    value: int | None              # 1 follows the rule, 0 does not, None unscored
    reason: str | None = None      # why unscored (or why a 0 was imposed); None for a clean verdict
    p_yes: float | None = None     # P(Yes | the judge answers Yes or No), where the backend exposes it
    answer_mass: float | None = None  # P(the judge answers [[Yes]] or [[No]] at all), fast mode
    output: str | None = None      # the judge's text (generation modes), clipped
    cached: bool = False

    @property
    def scored(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict, cached: bool = False) -> "Verdict":
        return cls(**d, cached=cached)


def unscored(reason: str, **kw) -> Verdict:
    return Verdict(None, reason, **kw)


def reason_kind(reason: str | None) -> str:
    """'backend_error: Timeout ...' -> 'backend_error' (the counter key)."""
    return (reason or "").split(":")[0].split(" (")[0].strip()


NO_VERDICT = "no_verdict"  # reason of a 0 given to an answer holding neither verdict (the original's rule)


def parse_verdict(text: str | None, unparseable_as_no: bool = True) -> Verdict:
    """The paper's test: ``[[Yes]]`` anywhere in the output means 1; ``[[No]]`` means 0; anything else
    is 0 with the reason ``no_verdict`` (the original's substring test), or unscored when not
    ``unparseable_as_no`` (the stricter reading)."""
    text = text or ""
    clipped = text[:OUTPUT_CLIP]
    if YES in text:
        return Verdict(1, output=clipped)
    if NO in text:
        return Verdict(0, output=clipped)
    if unparseable_as_no:  # the original's substring test: anything without [[Yes]] is a 0 — still counted
        return Verdict(0, reason=f"{NO_VERDICT} (counted as 0)", output=clipped)
    return unscored("unparseable", output=clipped)
