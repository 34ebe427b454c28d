"""Generate the bundled synthetic product-review dataset (``data/reviews/``).

Every review is assembled from hand-written phrase banks with a seeded
``random.Random``, so the output is byte-identical on every run.  Sentiment is
carried by many different words and phrases (adjectives, verb phrases such as
"stopped working after a week" or "worth every penny"), mixed with neutral
filler about delivery, price, colour, size, usage, etc.  Ratings 5 and 1 use
mostly "strong" wording and ratings 4 and 2 mostly "mild" wording, so a rating
task is learnable too.  About 10% of reviews contain a mild contrast ("The box
was damaged, but the blender itself works great.") whose overall label is still
clear.  Rating 3 is never generated.

Usage::

    python data/make_bundled.py            # writes data/reviews/{train,validation,test}.jsonl
    python data/make_bundled.py --seed 7 --out /tmp/data
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

SPLITS: dict[str, int] = {"train": 2000, "validation": 250, "test": 250}
MIN_WORDS, MAX_WORDS = 12, 45
CONTRAST_RATE = 0.10

# fmt: off
# category -> (product-name nouns, singular noun used in the text, aspects, usages)
CATEGORIES: dict[str, tuple[list[str], str, list[str], list[str]]] = {
    "headphones": (["wireless headphones", "over-ear headphones", "noise-cancelling headphones"], "headset",
        ["sound", "bass", "noise cancelling", "microphone", "battery life"],
        ["on my commute", "at the gym", "for video calls"]),
    "blender": (["blender", "smoothie blender", "high-speed blender"], "blender",
        ["motor", "jug", "lid", "blade", "speed control"], ["for morning smoothies", "for soups", "to crush ice"]),
    "backpack": (["backpack", "travel backpack", "laptop backpack"], "backpack",
        ["zipper", "stitching", "laptop sleeve", "fabric", "shoulder padding"],
        ["for work", "on weekend hikes", "for travel"]),
    "coffee maker": (["coffee maker", "drip coffee machine", "espresso machine"], "coffee maker",
        ["water tank", "milk frother", "heating element", "brew strength", "carafe"],
        ["every morning", "for guests", "at the office"]),
    "smartwatch": (["smartwatch", "fitness watch", "GPS watch"], "watch",
        ["screen", "strap", "heart rate sensor", "battery life", "companion app"],
        ["for running", "to track my sleep", "all day"]),
    "vacuum cleaner": (["vacuum cleaner", "cordless vacuum", "robot vacuum"], "vacuum",
        ["suction", "dust bin", "filter", "battery life", "brush head"],
        ["on carpets", "for pet hair", "twice a week"]),
    "kettle": (["electric kettle", "glass kettle", "travel kettle"], "kettle",
        ["handle", "lid", "boil time", "spout", "temperature control"],
        ["for tea", "several times a day", "at the office"]),
    "desk lamp": (["desk lamp", "LED desk lamp", "clamp lamp"], "lamp",
        ["brightness", "arm", "base", "dimmer", "colour temperature"],
        ["for reading", "while working late", "at my desk"]),
    "office chair": (["office chair", "ergonomic chair", "mesh chair"], "chair",
        ["lumbar support", "armrest", "seat cushion", "gas lift", "backrest"],
        ["for long work days", "in my home office", "for gaming"]),
    "bluetooth speaker": (["bluetooth speaker", "portable speaker", "waterproof speaker"], "speaker",
        ["sound", "volume", "bass", "battery life", "pairing"], ["in the garden", "at the beach", "in the kitchen"]),
    "air fryer": (["air fryer", "dual-basket air fryer", "compact air fryer"], "air fryer",
        ["basket", "timer", "non-stick coating", "temperature dial", "capacity"],
        ["for chips", "for quick dinners", "most evenings"]),
    "phone case": (["phone case", "rugged phone case", "slim phone case"], "case",
        ["grip", "button cover", "camera cutout", "edge protection", "finish"],
        ["every day", "on building sites", "when cycling"]),
    "yoga mat": (["yoga mat", "non-slip yoga mat", "travel yoga mat"], "mat",
        ["grip", "thickness", "surface", "carry strap", "cushioning"],
        ["for morning yoga", "for pilates", "at the studio"]),
    "water bottle": (["water bottle", "insulated bottle", "sports bottle"], "bottle",
        ["lid", "insulation", "seal", "straw", "finish"], ["at the gym", "on hikes", "at my desk"]),
    "keyboard": (["mechanical keyboard", "wireless keyboard", "compact keyboard"], "keyboard",
        ["key feel", "backlight", "spacebar", "connection", "battery life"],
        ["for programming", "for gaming", "for writing"]),
    "power bank": (["power bank", "slim power bank", "fast-charging power bank"], "power bank",
        ["capacity", "charging speed", "cable", "display", "casing"],
        ["when travelling", "at festivals", "on long trips"]),
}
GENERIC_ASPECTS = ["build quality", "design", "price", "packaging", "instruction manual", "finish"]
BRANDS = ["Aurora", "Nimbus", "Vertex", "Kestrel", "Solace", "Orbit", "Maple", "Zenith", "Halcyon", "Copper & Oak",
          "Brightwell", "Northwind", "Pulse", "Lumen", "Tidal", "Everline", "Quill", "Summit", "Juniper", "Arcadia"]
MODELS = ["X2", "Pro", "Lite", "S3", "Max", "Mini", "One", "Air", "Plus", "Go", "500", "Elite", "V7", "Neo"]

# Sentiment phrase banks, keyed by (polarity, strength).
VERB_PHRASES: dict[tuple[str, str], list[str]] = {
    ("pos", "strong"): [
        "is worth every penny", "exceeded all my expectations", "works flawlessly", "is absolutely brilliant",
        "is the best purchase I have made this year", "blew me away", "is simply outstanding",
        "feels incredibly well made", "is a total game changer", "performs beautifully", "is perfect in every way",
        "has been fantastic from the start", "is an absolute delight to use", "outperforms models twice the price",
        "is exceptional value", "is superb in every respect", "has made my life so much easier",
        "is a joy to use every single day", "is built like a tank", "is stunning and works perfectly",
        "impressed everyone in the house", "is pure quality"],
    ("pos", "mild"): [
        "is pretty good", "does the job well", "works well enough", "is good value for the price", "is solid overall",
        "is a nice upgrade", "has been reliable for me", "mostly meets my needs", "is decent for everyday use",
        "performs well", "is a sensible buy", "feels well built", "is a good choice", "is easy to use",
        "works as described", "is comfortable and dependable", "is a handy little thing", "does what I need it to"],
    ("neg", "mild"): [
        "is a bit disappointing", "feels rather flimsy", "is overpriced for what it is", "works, but only just",
        "is noticeably worse than my old one", "is underwhelming", "struggles with anything beyond basic use",
        "could be much better for the price", "is mediocre at best", "feels cheaper than it looks in the photos",
        "has a few annoying flaws", "is fiddly to use", "is less sturdy than I hoped", "is louder than expected",
        "wears out faster than it should", "is only average", "needs a lot of patience", "is awkward to clean"],
    ("neg", "strong"): [
        "stopped working after a week", "broke the first time I used it", "is a complete waste of money",
        "fell apart within days", "is absolute junk", "died after two uses",
        "is the worst purchase I have made in years", "arrived broken and support never replied",
        "is dangerously flimsy", "overheats constantly", "is utterly useless", "started smoking on the second use",
        "is a total rip-off", "cracked within a week", "never worked properly", "is cheaply made garbage",
        "gave up after a month", "is an utter disappointment", "feels like a cheap toy", "was dead on arrival",
        "is a nightmare to use", "caused nothing but problems"],
}
ADJECTIVES: dict[tuple[str, str], list[str]] = {
    ("pos", "strong"): ["excellent", "fantastic", "superb", "outstanding", "brilliant", "amazing", "exceptional",
                        "first-class", "wonderful", "incredible", "flawless", "stunning"],
    ("pos", "mild"): ["good", "pretty good", "decent", "solid", "nice", "reasonable", "pleasant", "quite good",
                      "better than expected", "reliable", "comfortable enough", "fine for daily use"],
    ("neg", "mild"): ["disappointing", "mediocre", "underwhelming", "a bit weak", "rather poor", "below average",
                      "somewhat flimsy", "a letdown", "average at best", "weaker than advertised", "fiddly",
                      "uninspiring"],
    ("neg", "strong"): ["terrible", "awful", "dreadful", "useless", "horrible", "abysmal", "atrocious", "pathetic",
                        "appalling", "shockingly bad", "a joke", "rubbish"],
}
STANDALONE: dict[tuple[str, str], list[str]] = {
    ("pos", "strong"): ["Highly recommended!", "I would buy it again in a heartbeat.",
                        "Best money I have spent in ages.", "No hesitation, just buy it.", "I absolutely love it.",
                        "Could not be happier with it.", "Worth every penny.", "Buy it, you will not regret it.",
                        "An absolute bargain.", "I have already recommended it to all my friends.",
                        "Honestly perfect."],
    ("pos", "mild"): ["Happy with the purchase overall.", "Good value for money.", "I would recommend it.",
                      "Does what it says.", "A sensible buy.", "Pleased with it so far.", "It does the job nicely.",
                      "Solid choice for the price.", "Would probably buy again.", "A nice little upgrade."],
    ("neg", "mild"): ["A bit of a letdown.", "I expected more for the price.", "Not sure I would buy it again.",
                      "Only just acceptable.", "Somewhat disappointed.", "There are better options out there.",
                      "Mediocre value for money.", "It feels overpriced.", "I regret the purchase a little."],
    ("neg", "strong"): ["Avoid at all costs.", "Complete waste of money.", "Save your money.", "Returning it tomorrow.",
                        "Worst purchase I have ever made.", "Total rip-off.", "Do not buy this.", "I want a refund.",
                        "Absolute junk.", "Genuinely awful product.", "Utterly disappointed."],
}
TITLES: dict[tuple[str, str], list[str]] = {
    ("pos", "strong"): ["Absolutely love it", "Worth every penny", "Best purchase this year", "Outstanding", "Love it",
                        "Exceeded expectations", "Brilliant {noun}", "Simply the best", "Fantastic quality"],
    ("pos", "mild"): ["Great value", "Pretty good", "Does the job", "Solid {noun}", "Good for the price",
                      "Happy with it", "Nice upgrade", "Reliable so far"],
    ("neg", "mild"): ["A bit disappointing", "Not quite what I hoped", "Could be better", "Overpriced", "Meh",
                      "Underwhelming", "Expected more", "Just average"],
    ("neg", "strong"): ["Waste of money", "Avoid", "Broke within a week", "Total junk", "Do not buy", "Terrible {noun}",
                        "Worst purchase ever", "Complete rip-off"],
}
NEUTRAL_TITLES = ["My thoughts after a month", "Honest review", "First impressions", "{Noun} review",
                  "Long-term update", "Bought as a gift", "Review after two weeks", "Second one from this brand"]
# Mild opposite-polarity remarks for contrast sentences.
MINOR_NEG = ["The box was damaged", "Delivery was a day late", "The manual is poorly written",
             "The colour is slightly different from the photos", "The packaging was excessive",
             "The cable is a bit short"]
MINOR_POS = ["Delivery was fast", "It looks nice", "The packaging was lovely", "The price seemed fair",
             "The colour is lovely", "Setup was quick"]
OPENERS = ["After {duration} of use,", "So far,", "Honestly,", "Compared to my old one,", "For everyday use,",
           "Out of the box,", "Overall,", "To be honest,", "For {price},", "In my experience,"]
FILLERS = ["I bought it for my {person}.", "Delivery took {n} days.", "I ordered the {colour} one.",
           "It comes in {colour} and {colour2}.", "I paid {price} for it.", "I have had it for {duration} now.",
           "I mainly use it {usage}.", "It replaced my old {noun}.", "It is about the size of {size}.",
           "The {aspect} was the main reason I picked this model.", "Setup took about {n} minutes.",
           "This is my second {noun} from {brand}.", "I got it mostly to use {usage}."]
PEOPLE = ["dad", "mum", "sister", "brother", "partner", "son", "daughter", "flatmate", "grandmother"]
COLOURS = ["black", "white", "grey", "navy", "red", "sage green", "silver", "cream", "blue"]
DURATIONS = ["two weeks", "a month", "three months", "six weeks", "half a year", "a few days"]
PRICES = ["about forty pounds", "under thirty dollars", "around sixty euros", "nearly a hundred dollars",
          "twenty pounds"]
SIZES = ["a paperback", "a shoebox", "a water bottle", "a small suitcase", "my hand"]
STRONG_P = {5: 0.8, 4: 0.2, 2: 0.2, 1: 0.8}  # chance that a sentiment unit uses strong wording
# fmt: on


def fill(rng: random.Random, template: str, ctx: dict[str, str]) -> str:
    """Fill ``{slots}`` in a template from the review context and random choices."""
    cat = CATEGORIES[ctx["category"]]
    usage = rng.choice(cat[3])
    colour, colour2 = rng.sample(COLOURS, 2)
    values = {
        "noun": cat[1],
        "Noun": cat[1].capitalize(),
        "brand": ctx["brand"],
        "person": rng.choice(PEOPLE),
        "n": str(rng.randint(2, 12)),
        "colour": colour,
        "colour2": colour2,
        "price": rng.choice(PRICES),
        "duration": rng.choice(DURATIONS),
        "usage": usage,
        "size": rng.choice(SIZES),
        "aspect": rng.choice(cat[2]),
    }
    return template.format(**values)


def subject(rng: random.Random, ctx: dict[str, str], sentence_start: bool) -> str:
    """A way to refer to the product: 'it', 'this blender', 'the Aurora X2', ..."""
    noun = CATEGORIES[ctx["category"]][1]
    named = f"the {ctx['brand']} {ctx['model']}"
    subj = rng.choice(["it", "it", f"this {noun}", f"the {noun}", f"my new {noun}", named])
    return subj[0].upper() + subj[1:] if sentence_start else subj


def strength(rng: random.Random, rating: int) -> str:
    return "strong" if rng.random() < STRONG_P[rating] else "mild"


def verb_sentence(rng: random.Random, ctx: dict[str, str], pol: str, rating: int) -> str:
    vp = rng.choice(VERB_PHRASES[(pol, strength(rng, rating))])
    if rng.random() < 0.4:
        return f"{fill(rng, rng.choice(OPENERS), ctx)} {subject(rng, ctx, False)} {vp}."
    return f"{subject(rng, ctx, True)} {vp}."


def aspect_sentence(rng: random.Random, ctx: dict[str, str], pol: str, rating: int) -> str:
    aspect = rng.choice(CATEGORIES[ctx["category"]][2] + GENERIC_ASPECTS)
    return f"The {aspect} is {rng.choice(ADJECTIVES[(pol, strength(rng, rating))])}."


def contrast_sentence(rng: random.Random, ctx: dict[str, str], pol: str, rating: int) -> str:
    minor = rng.choice(MINOR_NEG if pol == "pos" else MINOR_POS)
    noun = CATEGORIES[ctx["category"]][1]
    return f"{minor}, but the {noun} itself {rng.choice(VERB_PHRASES[(pol, strength(rng, rating))])}."


def make_text(rng: random.Random, ctx: dict[str, str], pol: str, rating: int, contrast: bool) -> str:
    """Assemble a 1-3 sentence review body whose overall polarity is ``pol``."""
    if contrast:
        body = [contrast_sentence(rng, ctx, pol, rating)]
        if rng.random() < 0.5:
            body.append(aspect_sentence(rng, ctx, pol, rating))
        else:
            body.append(rng.choice(STANDALONE[(pol, strength(rng, rating))]))
    else:
        body = [verb_sentence(rng, ctx, pol, rating)]
        n_extra = rng.choices([0, 1, 2], weights=[2, 5, 4])[0]
        kinds = rng.sample(["aspect", "standalone", "filler"], n_extra)
        if "aspect" in kinds:
            body.append(aspect_sentence(rng, ctx, pol, rating))
        if "filler" in kinds:
            filler = fill(rng, rng.choice(FILLERS), ctx)
            body.insert(0 if rng.random() < 0.5 else len(body), filler)
        if "standalone" in kinds:
            body.append(rng.choice(STANDALONE[(pol, strength(rng, rating))]))
    return " ".join(body)


def make_title(rng: random.Random, ctx: dict[str, str], pol: str, rating: int) -> str:
    noun = CATEGORIES[ctx["category"]][1]
    if rng.random() < 0.15:
        template = rng.choice(NEUTRAL_TITLES)
    else:
        template = rng.choice(TITLES[(pol, strength(rng, rating))])
    return template.format(noun=noun, Noun=noun.capitalize())


def make_catalogue(rng: random.Random, per_category: int = 6) -> dict[str, list[tuple[str, str, str]]]:
    """Fixed set of (brand, model, product name) per category, so products recur across reviews."""
    catalogue: dict[str, list[tuple[str, str, str]]] = {}
    for category, (names, _, _, _) in CATEGORIES.items():
        items = []
        for _ in range(per_category):
            brand, model = rng.choice(BRANDS), rng.choice(MODELS)
            items.append((brand, model, f"{brand} {model} {rng.choice(names)}"))
        catalogue[category] = items
    return catalogue


def generate(seed: int) -> dict[str, list[dict[str, object]]]:
    """Generate all splits; texts are unique across splits."""
    rng = random.Random(seed)
    catalogue = make_catalogue(rng)
    seen: set[str] = set()
    out: dict[str, list[dict[str, object]]] = {}
    next_id = 1
    for split, size in SPLITS.items():
        ratings = ([5, 1, 4, 2] * (size // 4 + 1))[:size]
        rng.shuffle(ratings)
        rows = []
        for rating in ratings:
            pol = "pos" if rating >= 4 else "neg"
            category = rng.choice(sorted(CATEGORIES))
            brand, model, product = rng.choice(catalogue[category])
            ctx = {"category": category, "brand": brand, "model": model}
            contrast = rng.random() < CONTRAST_RATE  # decided up front so length filtering cannot skew the rate
            while True:  # regenerate on duplicate text or out-of-range length
                text = make_text(rng, ctx, pol, rating, contrast)
                if text not in seen and MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    break
            seen.add(text)
            rows.append(
                {
                    "id": f"rev-{next_id:05d}",
                    "category": category,
                    "product": product,
                    "title": make_title(rng, ctx, pol, rating),
                    "text": text,
                    "rating": rating,
                    "sentiment": "positive" if pol == "pos" else "negative",
                }
            )
            next_id += 1
        out[split] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    splits = generate(args.seed)
    folder = args.out / "reviews"
    folder.mkdir(parents=True, exist_ok=True)
    print("| split | rows | positive | negative | rating 1 | rating 2 | rating 4 | rating 5 | words min/mean/max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        sent = Counter(r["sentiment"] for r in rows)
        rat = Counter(r["rating"] for r in rows)
        words = [len(str(r["text"]).split()) for r in rows]
        print(
            f"| {split} | {len(rows)} | {sent['positive']} | {sent['negative']} | {rat[1]} | {rat[2]} | {rat[4]} | "
            f"{rat[5]} | {min(words)}/{sum(words) / len(words):.1f}/{max(words)} |"
        )
    print(f"wrote {', '.join(f'{s}.jsonl' for s in splits)} to {folder}")


if __name__ == "__main__":
    main()
