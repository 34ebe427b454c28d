"""Rule-based judges of generated answers: scorers `(prediction, reference) -> float` like `metrics`' ones, named
by `_target_` in a dataset's `metrics:`, so training, `tunelab eval`, `compare` and pipelines report them alike.

`BrandVoice` checks the written-down brand voice of the bundled preference task (data/README.md, "preference/"):
1. thanks: the reply thanks the customer ("thank you");
2. product: the reply names the product the reference reply names (the reference writes it "your <product>" and
   punctuation; a reference without one skips the rule);
3. apology: when the reference apologises (the review was negative), the reply says "sorry" and offers a fix (a
   replacement or a refund);
4. signature: the reply ends with the sign-off.
"""

from __future__ import annotations

import re

RULES = ("thanks", "product", "apology", "signature")
# "your <product>" up to punctuation, with no other "your" inside ("your feedback on your <product>.")
_PRODUCT = re.compile(r"\byour ((?:(?!\byour\b)[^.,!?;])+)[.,!?;]", re.IGNORECASE)
_FIXES = ("replacement", "replace", "refund")


class BrandVoice:
    """1.0 when a reply keeps `rule` (one of RULES), or every applicable rule (`all`, the default); `share` gives
    the fraction of applicable rules kept instead."""

    def __init__(self, rule: str = "all", signature: str = "Best wishes, the Larkspur team.",
                 share: bool = False) -> None:
        if rule != "all" and rule not in RULES:
            from tunelab.errors import ConfigError

            raise ConfigError(f"unknown brand-voice rule {rule!r}", "key dataset.metrics",
                              f"rules: all, {', '.join(RULES)}")
        self.rule, self.signature, self.share = rule, " ".join(signature.lower().split()), share

    def checks(self, prediction: str, reference: str) -> dict[str, bool]:
        """Each applicable rule: kept or not."""
        reply, ref = " ".join(prediction.lower().split()), reference.lower()
        out = {"thanks": "thank you" in reply, "signature": reply.endswith(self.signature)}
        named = _PRODUCT.search(ref)
        if named:
            out["product"] = " ".join(named.group(1).split()) in reply
        if "sorry" in ref:
            out["apology"] = "sorry" in reply and any(fix in reply for fix in _FIXES)
        return out

    def __call__(self, prediction: str, reference: str) -> float:
        checks = self.checks(prediction, reference)
        if self.rule != "all":
            return float(checks.get(self.rule, True))  # a rule that does not apply is kept
        if self.share:
            return sum(checks.values()) / len(checks)
        return float(all(checks.values()))
