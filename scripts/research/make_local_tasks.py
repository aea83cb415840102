"""Build the small local tasks that ship with gqa-convert (gqa_convert/evaluation/local_tasks/) from the
held-out part of WikiText-2's raw test split, with no network:

- `wikitext_lastword` (LAMBADA-style): the longest run of whole sentences of one paragraph (at most 150
  words, at least 40) that ends with a full stop; the model must produce the passage's last word
  (greedy, every token). Only passages whose last word is a content word (3+ letters, not a stop word)
  that already occurs (any case) in an EARLIER sentence of the passage are kept, so the word is
  recoverable from the wider context, not from the last sentence alone.
- `wikitext_nextsentence` (multiple choice, HellaSwag-like): two consecutive sentences of a paragraph;
  the choices are the true next sentence and three sentences of similar length drawn from other
  paragraphs of the same article (so the topic gives nothing away).

    python scripts/research/make_local_tasks.py --wikitext wikitext-2-raw/wiki.test.raw [--out DIR]

Held out: the text after the first line break past 70% of its characters (the split scripts/ablation.py
uses: the first 70% calibrates, the rest measures). The raw text's tokenized spacing (" @-@ ", " , ")
is undone first. Each task gets `--examples` test examples and `--fewshot` others for few-shot prompts,
drawn with `--seed`; the output is byte-identical for the same input and arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

HEADING = re.compile(r"^ = [^=].* = $")  # an article's title; sections are " = = ... = = "
SECTION = re.compile(r"^ =( =)+ .* (= )+=$")
JOINS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}
CONTRACTIONS = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b")
SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
SPACE_AFTER = re.compile(r"([(\[{$]) ")
QUOTED = re.compile(r'" ([^"]*?) "')
SENTENCE_END = re.compile(r"(?<=[.!?])(?:\"|'|\))?\s+(?=[\"'(]?[A-Z0-9])")
# A full stop after these is not a sentence end (initials, titles, common abbreviations).
ABBREVIATION = re.compile(
    r"(\b[A-Z]|\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Lt|Gen|Col|Capt|Sgt|Maj|Rev|Gov|Sen|Rep|No|vs|c|ca|Co|Inc|Ltd|Mt|Ft|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|e\.g|i\.e|etc))\.$"
)
_STOP_WORDS = (
    "the and for are but not you all any can had her was one our out has him his how its may new now "
    "old see two who did get let put say she too use that with have this will your from they been were "
    "said each which their time when what there would about into than them then these some could other "
    "more also after first where most over such only very well those while being both through during "
    "before between under again until against because should since within without among later"
)
STOP_WORDS = frozenset(_STOP_WORDS.split())
LASTWORD_WORDS = (40, 150)  # passage length range
ANSWER_WORDS = (6, 50)  # next-sentence answer length range
DISTRACTORS = 3


def held_out(raw: str) -> str:
    cut = raw.index("\n", int(len(raw) * 0.7)) + 1
    return raw[cut:]


def detokenize(line: str) -> str:
    text = f" {line.strip()} "
    for spaced, joined in JOINS.items():
        text = text.replace(spaced, joined)
    text = CONTRACTIONS.sub(r"\1", text)
    text = SPACE_BEFORE.sub(r"\1", text)
    text = SPACE_AFTER.sub(r"\1", text)
    text = QUOTED.sub(r'"\1"', text)
    return " ".join(text.split())


def sentences(paragraph: str) -> list[str]:
    pieces = SENTENCE_END.split(paragraph)
    merged: list[str] = []
    for piece in pieces:
        if merged and ABBREVIATION.search(merged[-1]):
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return [piece.strip() for piece in merged if piece.strip()]


def articles(text: str) -> list[tuple[str, list[list[str]]]]:
    """(title, paragraphs as sentence lists) in text order; the held-out part may start mid-article."""
    found: list[tuple[str, list[list[str]]]] = [("(continued)", [])]
    for line in text.split("\n"):
        if HEADING.match(line):
            found.append((line.strip(" ="), []))
        elif line.strip() and not SECTION.match(line):
            split = sentences(detokenize(line))
            if len(split) >= 2:
                found[-1][1].append(split)
    return [(title, paragraphs) for title, paragraphs in found if paragraphs]


def lastword_examples(corpus: list[tuple[str, list[list[str]]]]) -> list[dict]:
    examples = []
    for title, paragraphs in corpus:
        for split in paragraphs:
            for end in range(1, len(split)):
                last = split[end]
                match = re.fullmatch(r"(.* )([A-Za-z]{3,})\.", last)
                if not match or match.group(2).lower() in STOP_WORDS:
                    continue
                word = match.group(2)
                start = end  # the longest run of whole sentences ending here within the word limit
                while start > 0 and len(" ".join(split[start - 1 : end + 1]).split()) <= LASTWORD_WORDS[1]:
                    start -= 1
                passage = " ".join(split[start : end + 1])
                earlier = " ".join(split[start:end])
                if not LASTWORD_WORDS[0] <= len(passage.split()) <= LASTWORD_WORDS[1]:
                    continue
                if not re.search(rf"\b{re.escape(word)}\b", earlier, re.IGNORECASE):
                    continue
                context = f"{earlier} {match.group(1)}".rstrip()
                examples.append({"context": context, "target": word, "article": title})
    return examples


def nextsentence_examples(corpus: list[tuple[str, list[list[str]]]], rng: random.Random) -> list[dict]:
    examples = []
    for title, paragraphs in corpus:
        for index, split in enumerate(paragraphs):
            answers = [i for i in range(2, len(split)) if ANSWER_WORDS[0] <= len(split[i].split()) <= ANSWER_WORDS[1]]
            if not answers:
                continue
            i = rng.choice(answers)
            answer = split[i]
            size = len(answer.split())
            pool = sorted(
                {
                    sentence
                    for other, sentences_ in enumerate(paragraphs)
                    if other != index
                    for sentence in sentences_
                    if size / 2 <= len(sentence.split()) <= size * 2 and sentence != answer
                }
            )
            if len(pool) < DISTRACTORS:
                continue
            choices = [answer, *rng.sample(pool, DISTRACTORS)]
            rng.shuffle(choices)
            context = f"{split[i - 2]} {split[i - 1]}"
            examples.append({"context": context, "choices": choices, "label": choices.index(answer), "article": title})
    return examples


def split_examples(examples: list[dict], count: int, fewshot: int, rng: random.Random) -> dict[str, list[dict]]:
    """Test and few-shot examples, disjoint, each in text order."""
    if len(examples) < count + fewshot:
        raise SystemExit(f"only {len(examples)} candidates for {count} + {fewshot} examples")
    order = rng.sample(range(len(examples)), count + fewshot)
    return {
        "test": [examples[i] for i in sorted(order[:count])],
        "fewshot": [examples[i] for i in sorted(order[count:])],
    }


def write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext", type=Path, required=True, help="wikitext-2-raw-v1 wiki.test.raw")
    parser.add_argument("--out", type=Path, default=Path("gqa_convert/evaluation/local_tasks"))
    parser.add_argument("--examples", type=int, default=300, help="test examples per task")
    parser.add_argument("--fewshot", type=int, default=16, help="few-shot examples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    raw = args.wikitext.read_text(encoding="utf-8")
    corpus = articles(held_out(raw))
    print(f"held out: {sum(len(p) for _, p in corpus)} paragraphs in {len(corpus)} articles")
    candidates = {
        "wikitext_lastword": lastword_examples(corpus),
        "wikitext_nextsentence": nextsentence_examples(corpus, random.Random(args.seed)),
    }
    for name, examples in candidates.items():
        splits = split_examples(examples, args.examples, args.fewshot, random.Random(args.seed))
        for split, rows in splits.items():
            path = args.out / f"{name}.{split}.jsonl"
            digest = write_jsonl(path, rows)
            print(f"{path}: {len(rows)} of {len(examples)} candidates, {path.stat().st_size:,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
