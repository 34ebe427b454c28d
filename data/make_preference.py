"""Generate the bundled preference task (``data/preference/``): brand-voice replies to the bundled reviews.

Each row is one review of ``data/reviews/<split>.jsonl`` (same splits, same order) with two replies written on
behalf of the fictional brand Larkspur: ``chosen`` keeps every rule of the brand voice (data/README.md,
"preference/"), ``rejected`` is the same reply with exactly one rule broken (``broken`` names it). Replies are
assembled from phrase banks with a seeded ``random.Random``, stdlib only, so the output is byte-identical on
every run.

The rules (checked by ``tunelab.evaluation.judges.BrandVoice``):
1. thanks: the reply thanks the customer ("Thank you ...").
2. product: the reply names the product, as "your <product>" followed by punctuation (a rejected reply says
   "your review" only, or, for half of the rows that break this rule, names another product of the same brand:
   the near miss a model that copies the product badly writes).
3. apology: on a negative review the reply apologises ("sorry") and offers a fix (a replacement or a refund).
4. signature: the reply ends with the sign-off "Best wishes, the Larkspur team."

Usage::

    python data/make_preference.py          # writes data/preference/{train,validation,test}.jsonl
    python data/make_preference.py --seed 7 --reviews data/reviews --out /tmp/preference
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

SIGNATURE = "Best wishes, the Larkspur team."
INSTRUCTION = "Write the Larkspur reply to this customer review."

# fmt: off
THANKS = ["Thank you for reviewing your {product}.", "Thank you for your feedback on your {product}.",
          "Thank you for taking the time to write about your {product}.", "Thank you for choosing your {product}."]
NO_THANKS = ["We have read your review of your {product}.", "This is about your {product}.",
             "We saw your comments on your {product}.", "Your review of your {product} has reached us."]
NO_PRODUCT = ["Thank you for your review.", "Thank you for taking the time to write to us.",
              "Thank you for your feedback.", "Thank you for sharing your experience."]
GLAD = ["We are glad it works so well for you.", "It is great to hear that you enjoy it.",
        "We are delighted it lives up to your expectations.", "Our team will be happy to read this."]
SORRY = ["We are sorry it let you down.", "We are very sorry for the trouble.",
         "We are sorry it did not meet your expectations.", "We are truly sorry about this experience."]
NOT_SORRY = ["We have noted your comments.", "Your comments have been passed on.",
             "We have recorded your feedback.", "Thanks to reviews like this we keep improving."]
FIX = ["Please reply with your order number and we will send a free replacement.",
       "Contact our support team and we will arrange a replacement or a full refund.",
       "We would like to make it right with a replacement or a refund.",
       "Write to us and we will refund you or replace it at no cost."]
NO_FIX = ["We hope your next purchase goes better.", "We hope this does not happen again.",
          "Products like this usually last for years.", "We hope you will give us another chance."]
OTHER_SIGN = ["Best wishes, the support desk.", "Kind regards, customer service.", "Cheers!", ""]
# fmt: on


def near_miss(product: str, catalog: list[str], seed: str) -> str | None:
    """Another product of the catalog, of the same brand where there is one, for half of the rows (by `seed`, a
    string, so the other rows' draws do not move); None for the other half."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return None
    others = [p for p in catalog if p != product and product not in p and p not in product]
    same_brand = [p for p in others if p.split()[0] == product.split()[0]]
    return rng.choice(same_brand or others)


def reply(rng: random.Random, product: str, negative: bool, broken: str | None, other: str | None = None) -> str:
    """One reply; `broken` names the one rule it breaks (None: keeps them all); `other`, with `broken="product"`,
    a wrong product to name instead of none. Banks are drawn in the same order whatever is broken, so a pair's
    replies differ only where the rule is."""
    picks = [rng.randrange(4) for _ in range(5)]
    opening = {"thanks": NO_THANKS, "product": NO_PRODUCT}.get(broken or "", THANKS)[picks[0]]
    if broken == "product" and other:
        opening, product = THANKS[picks[0]], other
    if negative:
        body = [SORRY[picks[1]], FIX[picks[2]]]
        if broken == "apology":  # either half of the rule missing breaks it
            body = [NOT_SORRY[picks[1]], FIX[picks[2]]] if picks[3] % 2 else [SORRY[picks[1]], NO_FIX[picks[2]]]
    else:
        body = [GLAD[picks[1]]]
    sign = OTHER_SIGN[picks[4]] if broken == "signature" else SIGNATURE
    return " ".join(part for part in [opening.format(product=product), *body, sign] if part)


def row(review: dict, rng: random.Random, catalog: list[str], seed: int) -> dict:
    negative = review["sentiment"] == "negative"
    rules = ["thanks", "product", "signature"] + (["apology"] if negative else [])
    broken = rules[rng.randrange(len(rules))]
    state = rng.getstate()
    chosen = reply(rng, review["product"], negative, None)
    rng.setstate(state)  # the same draws: the rejected reply is the chosen one with one rule broken
    other = near_miss(review["product"], catalog, f"{seed}-{review['id']}") if broken == "product" else None
    rejected = reply(rng, review["product"], negative, broken, other)
    prompt = f"{INSTRUCTION}\n\nProduct: {review['product']}\nReview: {review['text']}"
    return {"id": review["id"].replace("rev", "pref"), "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "broken": broken, "sentiment": review["sentiment"], "product": review["product"]}


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--reviews", type=Path, default=here / "reviews")
    parser.add_argument("--out", type=Path, default=here / "preference")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {split: [json.loads(line) for line in (args.reviews / f"{split}.jsonl").read_text().splitlines() if line]
              for split in ("train", "validation", "test")}
    catalog = sorted({review["product"] for reviews in splits.values() for review in reviews})
    for index, (split, reviews) in enumerate(splits.items()):
        rng = random.Random(args.seed * 1000 + index)
        rows = [row(review, rng, catalog, args.seed) for review in reviews]
        with (args.out / f"{split}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{split}: {len(rows)} rows, broken rules {dict(sorted(Counter(r['broken'] for r in rows).items()))}")


if __name__ == "__main__":
    main()
