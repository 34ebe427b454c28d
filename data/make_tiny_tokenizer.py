"""Train the tiny byte-level BPE tokenizer and write the tiny Llama config.

Output directory: ``src/tunelab/assets/tiny-llama/`` containing

* ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja`` --
  a 2048-entry byte-level BPE tokenizer (``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>`` = eos, ``<|pad|>`` = pad; no bos; ChatML chat template),
* ``config.json`` / ``generation_config.json`` -- a ~2M parameter ``LlamaConfig``.

No weights are written: the model is randomly initialised at run time with
``AutoModelForCausalLM.from_config``.  The tokenizer is trained on every string
field of ``data/reviews/*.jsonl`` plus a list of instruction / medical / NER
words (repeated so that they get merges of their own).  Run it after
``data/make_bundled.py``::

    python data/make_tiny_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EXTRA_WORD_REPEATS = 20
# ChatML, same shape as Qwen2.5's template without tools and without a default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROMPT_TEMPLATES = [
    "Is the following review positive or negative?\n\nTitle: {title}\nReview: {text}",
    "Classify the sentiment of this product review. Answer with positive or negative.\n\n{text}",
    "What rating from 1 to 5 did the customer give?\n\nReview: {text}\nAnswer: {rating}",
    "Question: Which product is this review about?\nAnswer: {product}",
]
EXTRA_WORDS = """
system user assistant Answer Question Classify Instruction Input Output Response Context Summary Label Labels
sentiment positive negative neutral review reviews rating ratings title product category text score stars
the following this that these those which what who where when why how is are was were be been being have has had
do does did will would can could should may might must shall a an and or but if then else not no yes of in on at
to for from by with about into over under between after before during without within across through up down out
it its they them their he she his her we our you your i me my one two three four five six seven eight nine ten
first second third last next previous each every all any some many most more less few other another same such only
very also just than too again once here there now always never often sometimes usually please thanks thank
give given write rewrite answer respond reply explain describe list extract expand identify find return choose
select predict decide determine summarise summarize translate convert format output input provide generate read
word words sentence sentences paragraph document note notes letter report example examples list item items
short long brief single multiple correct incorrect true false good bad best worst better worse great poor high low
number numbers name names value values type types class classes option options choice choices result results
JSON key keys field fields string format following below above given only exactly one word lowercase uppercase
abbreviation abbreviations acronym acronyms expansion expand expanded full form stands meaning means medical clinical
patient patients doctor nurse hospital clinic ward diagnosis diagnosed history examination treatment therapy
medication medicine dose drug drugs symptom symptoms pain chest breath shortness blood pressure heart rate
cardiology cardiac cardiologist cardiovascular coronary artery arteries arterial disease failure attack
hypertension hypotension hypertensive myocardial infarction ischaemia ischemia ischaemic ischemic angina
atrial fibrillation flutter ventricular tachycardia bradycardia arrhythmia septal defect patent ductus arteriosus
foramen ovale aortic mitral tricuspid pulmonary valve stenosis regurgitation murmur congenital
echocardiogram echocardiography electrocardiogram ECG EKG MRI CT scan ultrasound catheterisation catheterization
paediatric pediatric paediatrics pediatrics neonatal neonate infant child children adult adults elderly
left right upper lower anterior posterior acute chronic severe mild moderate stable unstable normal abnormal
syndrome infection fever cough diabetes mellitus type insulin kidney renal liver hepatic lung lungs respiratory
stroke transient ischaemic thrombosis embolism deep vein bypass graft surgery procedure stent angioplasty
entity entities person people organisation organization location place places date dates time company city
country government university school team club river mountain street London Paris Berlin Madrid Rome
John Mary James Sarah David Emma Michael Anna Smith Jones Brown Taylor Williams Johnson
said says told announced visited met joined founded based located born lives works worked president minister
""".split()


def read_reviews(folder: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def corpus(rows: list[dict[str, object]]) -> Iterator[str]:
    """Review strings, instruction-style prompts built from them, and the extra word list."""
    for row in rows:
        yield from (v for v in row.values() if isinstance(v, str))
    for i, row in enumerate(rows):
        yield PROMPT_TEMPLATES[i % len(PROMPT_TEMPLATES)].format(**row)
    for _ in range(EXTRA_WORD_REPEATS):
        yield " ".join(EXTRA_WORDS)
        yield "\n".join(w.capitalize() for w in EXTRA_WORDS)


def train_tokenizer(rows: list[dict[str, object]]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(rows), trainer=trainer)
    return tok


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=Path, default=REPO / "data" / "reviews")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "tunelab" / "assets" / "tiny-llama")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    rows = read_reviews(args.reviews)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(rows),
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)

    tok = AutoTokenizer.from_pretrained(args.out)
    eos_id, pad_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|pad|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert eos_id != pad_id and len(tok) == VOCAB_SIZE, (eos_id, pad_id, len(tok))

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config.save_pretrained(args.out)
    GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(args.out)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    # Checks: exact round trip, chat template, prompt length distribution.
    texts = [str(v) for row in rows for v in row.values() if isinstance(v, str)]
    bad = [s for s in texts if tok.decode(tok.encode(s, add_special_tokens=False)) != s]
    assert not bad, bad[:3]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", repr(chat)
    prompts = [
        f"<|im_start|>user\nIs the following review positive or negative?\n\nTitle: {r['title']}\n"
        f"Review: {r['text']}<|im_end|>\n<|im_start|>assistant\n{r['sentiment']}<|im_end|>\n"
        for r in rows
    ]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    words = [len(str(r["text"]).split()) for r in rows]
    print(f"vocab size (len(tokenizer)): {len(tok)}; eos <|im_end|>={eos_id}; pad <|pad|>={pad_id}")
    print(f"parameters: {n_params:,}")
    print(f"round trip ok on {len(texts)} strings; chat template ok: {chat!r}")
    print(
        f"sentiment prompt tokens over {len(rows)} reviews: p50={percentile(lengths, 0.5)} "
        f"p95={percentile(lengths, 0.95)} max={max(lengths)} (review words mean {sum(words) / len(words):.1f})"
    )
    print("wrote", ", ".join(sorted(p.name for p in args.out.iterdir())), "to", args.out)


if __name__ == "__main__":
    main()
