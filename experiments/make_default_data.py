"""Builds a rule-labelled preference data set from the real default model.

Every reply in the output (by default ``experiments/data/rule_pairs.jsonl``) is text written by
SmolLM2-135M-Instruct (``compo.models.EmbeddedSmolLM2``, fp32, CPU) for the prompts in
``experiments/data/default_prompts.txt``; a fixed labelling rule, implemented below, turns the
replies into (chosen, rejected) pairs of known kind: clear or ambiguous. Nothing is labelled by
hand. The embedded default data set (``compo/assets/default_pairs.jsonl``) is currently the
noisy-click benchmark's small version instead (``experiments/benchmark/simulate.py``); pass
``--out compo/assets/default_pairs.jsonl`` to ship this set in its place.

Generation (chat template with ``add_generation_prompt=True``, left padding, batched):

* one greedy answer per prompt (``max_new_tokens`` tokens at most);
* three sampled answers (temperature 0.8, top_p 0.95, no top-k) for every second prompt (p002,
  p004, ...) and for every prompt whose greedy answer is degenerate (sampling is the expensive
  part, and only these prompts use samples); each batch is seeded from ``(seed, batch index)``
  inside ``torch.random.fork_rng`` so the global RNG is left untouched.

Every answer is cut at the end-of-turn token. An answer that hit the token limit instead is trimmed
to its last complete sentence, else to its last complete line (poems), so replies rarely stop
mid-sentence. ``--answers`` saves the raw answers and ``--from-answers`` labels them again without
the model (the labelling rule can change without regenerating).

Labelling rule. A reply is *degenerate* when fewer than 60% of its word trigrams are distinct
(loops such as "Boil an egg: Boil an egg: ..."). A prompt whose greedy answer is not degenerate
("good prompt") yields two *clear* pairs, chosen = the greedy answer, the two kinds taken in turn
from the three below (a kind a reply is not eligible for is replaced by the third):

* ``off_topic``: rejected = the greedy answer to another good prompt of a different category
  (any other good prompt when a ``--limit`` run has one category only), picked by
  ``random.Random`` seeded from (seed, prompt index);
* ``truncated``: rejected = the answer broken off halfway through its last sentence (the words
  of that sentence halved, rounded down; the sentence needs at least 6 words), as when a length
  limit cuts a reply;
* ``repetitive``: rejected = the answer's first sentence (or first 8 words when that sentence is
  longer than 12) repeated four times.

A prompt whose greedy answer is degenerate yields one clear pair of kind ``degenerate``: chosen =
the first non-degenerate sampled answer, rejected = the degenerate greedy answer.

*Ambiguous* pairs hold two replies of near-equal quality:

* ``ambiguous_sampled``: two of the three sampled answers: the non-degenerate, different pair
  closest in word count, kept only if the shorter has at least 85% of the longer's words (summed
  log-probs of replies of very different length mostly measure length);
* ``ambiguous_edit``: the greedy answer (at least two sentences) and a copy without one sentence,
  the shortest one after the first (the first usually carries the direct answer).

Both are labelled by one weak rule: the reply that ends with sentence punctuation wins; then the one
that contains more of the prompt's content words; then the shorter one; then the one that sorts
first (only to make the rule total). Ambiguous candidates are taken round-robin over prompts
(alternating which kind comes first) until they make up ``--ambiguous-share`` of the pairs.

Pairs whose chosen and rejected would be identical are dropped and counted; the counts are printed.

Row schema (read by ``compo.data.load_pairs``; extra fields land in ``metadata``)::

    {"id", "prompt", "chosen", "rejected", "kind", "category", "prompt_id", "source"}

The same ``--seed``, ``--limit``, ``--batch-size`` and ``--max-new-tokens`` give a byte-identical
file (batch composition changes the padding and the sampling stream, so those are part of the key).

Commands (from the repository root)::

    # the committed file: 4.5 min on 2 shared CPU cores; OMP_NUM_THREADS=1 gives the same file
    # and keeps busy cores from slowing it down ~5x (25 min with the default threads at load 5)
    OMP_NUM_THREADS=1 python experiments/make_default_data.py --seed 0
    # a quick check (about a minute): 12 prompts, short answers, written elsewhere
    python experiments/make_default_data.py --limit 12 --max-new-tokens 24 --out /tmp/pairs.jsonl
    # the per-kind log-prob margin table of a file (2-7 min)
    python experiments/make_default_data.py --score-only --out experiments/data/rule_pairs.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout without installing compo

from compo.data import load_pairs  # noqa: E402
from compo.encoding import encode_pairs  # noqa: E402
from compo.models import EmbeddedSmolLM2  # noqa: E402
from compo.rundir import write_jsonl  # noqa: E402
from compo.scoring import score_pairs  # noqa: E402
from experiments import generation  # noqa: E402
from experiments.generation import TEMPERATURE, TOP_P  # noqa: E402

log = logging.getLogger("make_default_data")

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "default_prompts.txt"
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "rule_pairs.jsonl"
MODEL_TAG = "smollm2-135m-instruct"
N_SAMPLES = 3
# Sampled pairs must be of similar length: summed log-probs otherwise mostly measure length.
MIN_LENGTH_RATIO = 0.85
MIN_DISTINCT_TRIGRAMS = 0.6
CLEAR_KINDS = ("off_topic", "truncated", "repetitive")
AMBIGUOUS_KINDS = ("ambiguous_sampled", "ambiguous_edit")
ALL_KINDS = (*CLEAR_KINDS, "degenerate", *AMBIGUOUS_KINDS)
_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_CONTENT = re.compile(r"[a-z]{3,}")
# Too common to say whether a reply is about the prompt.
_STOPWORDS_TEXT = """
the and for are but not you your all any can her was one our out has have had how its may new now
see two way who did does get got let say she too use what when where which why with this that from
they them then than there their these those will would could should about into some give name write
short tell list make explain answer briefly simple sentence sentences words word example examples
"""
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


@dataclass
class Prompt:
    id: str
    category: str
    text: str


@dataclass
class Answer:
    text: str
    finished: bool  # ended with the end-of-turn token rather than the token limit


# --------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[Prompt]:
    """Reads ``## category`` sections of one prompt per line; ``# `` lines are comments."""
    prompts, category = [], None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if line.startswith("## "):
            category = line[3:].strip()
        elif line and not line.startswith("#"):
            if category is None:
                raise SystemExit(f"{path}: line {number}: prompt before any '## category' line")
            prompts.append(Prompt(f"p{len(prompts) + 1:03d}", category, line))
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    batch_size: int,
    max_new_tokens: int,
    sample: bool,
    seed: int,
) -> list[list[Answer]]:
    """Answers every prompt, greedily (one answer) or by sampling (``N_SAMPLES`` answers).

    Returns:
        Per prompt, its answers in generation order.
    """
    n = N_SAMPLES if sample else 1
    texts = [p.text for p in prompts]
    answers = generation.generate(
        model, tokenizer, texts, n, max_new_tokens, sample, seed, batch_rows=batch_size
    )
    return [[Answer(text, finished) for text, finished in row] for row in answers]


# --------------------------------------------------------------------------------------------
# Text helpers of the labelling rule
# --------------------------------------------------------------------------------------------


def _list_marker(text: str, i: int) -> bool:
    """True when the ``.`` at ``i`` ends a list marker such as "2." at the start of a line."""
    j = i
    while j > 0 and text[j - 1].isdigit():
        j -= 1
    return j < i and text[:j].rstrip(" \t")[-1:] in ("", "\n")


def sentence_ends(text: str) -> list[int]:
    """Offsets just past each sentence end: ``.!?`` (not a list marker), then space or the end."""
    ends = []
    for i, char in enumerate(text):
        if char in ".!?" and i > 0 and not text[i - 1].isspace() and not _list_marker(text, i):
            j = i + 1
            while j < len(text) and text[j] in "\"')]":
                j += 1
            if j == len(text) or text[j].isspace():
                ends.append(j)
    return ends


def clean(answer: Answer) -> Answer:
    """Cuts an answer that hit the token limit back to its last complete sentence.

    Without a complete sentence (poems, lists), it is cut back to its last complete line; without
    that either, it stays as it is.
    """
    if answer.finished:
        return answer
    text = answer.text
    ends = sentence_ends(text)
    if ends:
        return Answer(text[: ends[-1]].rstrip(), False)
    if "\n" in text.strip():
        return Answer(text[: text.rstrip().rfind("\n")].rstrip(), False)
    return answer


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` offsets of each sentence, surrounding whitespace excluded."""
    bounds = [0, *sentence_ends(text)]
    if bounds[-1] < len(text.rstrip()):
        bounds.append(len(text))
    spans = []
    for a, b in itertools.pairwise(bounds):
        piece = text[a:b]
        if piece.strip():
            start = a + len(piece) - len(piece.lstrip())
            spans.append((start, b - (len(piece) - len(piece.rstrip()))))
    return spans


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def is_degenerate(text: str) -> bool:
    """True when fewer than 60% of the word trigrams are distinct (a repetition loop)."""
    tokens = _TOKEN.findall(text.lower())
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    if len(trigrams) < 8:
        return False
    return len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS


def first_words(text: str, n: int) -> str:
    """The first ``n`` whitespace-separated words, original spacing kept."""
    matches = list(_WORD.finditer(text))
    return text[: matches[min(n, len(matches)) - 1].end()]


def truncated_reply(text: str) -> str | None:
    """The answer broken off halfway through its last sentence (that sentence needs 6+ words)."""
    spans = sentence_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    words = list(_WORD.finditer(text, start, end))
    if len(words) < 6:
        return None
    return text[: words[len(words) // 2 - 1].end()]


def edited_reply(text: str) -> str | None:
    """The answer without one sentence: the shortest after the first (the later one on ties).

    The first sentence usually carries the direct answer; the shortest of the others changes the
    reply least, which is what makes the pair near-identical.
    """
    spans = sentence_spans(text)
    if len(spans) < 2:
        return None
    j = min(range(1, len(spans)), key=lambda k: (spans[k][1] - spans[k][0], -k))
    # Remove the sentence with the whitespace before it, so the spacing elsewhere is untouched.
    return text[: spans[j - 1][1]] + text[spans[j][1] :]


def repetitive_reply(text: str) -> str | None:
    first = sentences(text)[0] if sentences(text) else text
    clause = first if len(_WORD.findall(first)) <= 12 else first_words(first, 8)
    if len(_WORD.findall(clause)) < 3:
        return None
    return " ".join([clause.strip()] * 4)


def content_words(text: str) -> set[str]:
    return {w for w in _CONTENT.findall(text.lower()) if w not in _STOPWORDS}


def weak_rule(prompt: str, a: str, b: str) -> tuple[str, str]:
    """Labels two near-equal replies: returns ``(chosen, rejected)``.

    Order of criteria: ends with sentence punctuation; more of the prompt's content words; shorter;
    sorts first (so the rule is total and deterministic).
    """
    topic = content_words(prompt)

    def key(reply: str) -> tuple:
        ends = reply.rstrip()[-1:] in (".", "!", "?")
        return (-int(ends), -len(topic & content_words(reply)), len(reply), reply)

    chosen, rejected = sorted((a, b), key=key)
    return chosen, rejected


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------


def row(prompt: Prompt, kind: str, chosen: str, rejected: str, source: str) -> dict:
    return {
        "id": f"{prompt.id}-{kind}",
        "prompt": prompt.text,
        "chosen": chosen,
        "rejected": rejected,
        "kind": kind,
        "category": prompt.category,
        "prompt_id": prompt.id,
        "source": f"{MODEL_TAG} {source}",
    }


def clear_pairs(
    prompts: list[Prompt], greedy: list[Answer], samples: dict[int, list[Answer]], seed: int
) -> tuple[list[dict], Counter]:
    """Clear pairs for every prompt (see the module docstring), and counts of what was dropped."""
    dropped: Counter = Counter()
    good = [i for i, answer in enumerate(greedy) if not is_degenerate(answer.text)]
    good_set = set(good)
    rows = []
    for i, prompt in enumerate(prompts):
        answer = greedy[i].text
        if i not in good_set:
            # A saved answers file (--from-answers) may lack samples for a prompt that only a
            # changed rule calls degenerate: dropped and counted, like an all-degenerate sample.
            usable = [s.text for s in samples.get(i, []) if not is_degenerate(s.text)]
            if not usable:
                dropped["degenerate: every sample degenerate too"] += 1
                continue
            rows.append(
                row(
                    prompt,
                    "degenerate",
                    usable[0],
                    answer,
                    f"sampled (T={TEMPERATURE}, top_p={TOP_P}) vs degenerate greedy",
                )
            )
            continue
        wanted = [CLEAR_KINDS[(i + k) % 3] for k in range(3)]
        made = 0
        for kind in wanted:
            if made == 2:
                break
            if kind == "off_topic":
                others = [j for j in good if prompts[j].category != prompt.category]
                # A --limit run may see one category only; any other prompt is off topic too.
                others = others or [j for j in good if j != i]
                if not others:
                    continue
                j = random.Random(seed * 100_003 + i).choice(others)
                rejected, source = (
                    greedy[j].text,
                    f"greedy; rejected: greedy answer to {prompts[j].id}",
                )
            elif kind == "truncated":
                rejected, source = (
                    truncated_reply(answer),
                    "greedy; rejected: it, broken off mid-sentence",
                )
            else:
                rejected, source = repetitive_reply(answer), "greedy; rejected: first sentence x4"
            if rejected is None:
                continue
            if rejected.strip() == answer.strip():
                dropped[f"{kind}: identical to chosen"] += 1
                continue
            rows.append(row(prompt, kind, answer, rejected, source))
            made += 1
    return rows, dropped


def closest_samples(samples: list[Answer]) -> tuple[str, str] | str:
    """The two non-degenerate, distinct samples closest in word count, or why there are none."""
    texts = [s.text for s in samples if not is_degenerate(s.text)]
    options = [(a, b) for a, b in itertools.combinations(texts, 2) if a.strip() != b.strip()]
    if not options:
        return "fewer than two distinct non-degenerate samples"

    def lengths(pair: tuple[str, str]) -> tuple[int, int]:
        return len(_WORD.findall(pair[0])), len(_WORD.findall(pair[1]))

    # min() keeps the first of equally close pairs, so the choice is deterministic.
    a, b = min(options, key=lambda p: abs(lengths(p)[0] - lengths(p)[1]))
    short, long = sorted(lengths((a, b)))
    if short < MIN_LENGTH_RATIO * long:
        return "no two samples of similar length"
    return a, b


def ambiguous_candidates(
    prompts: list[Prompt], greedy: list[Answer], samples: dict[int, list[Answer]]
) -> tuple[list[list[dict]], Counter]:
    """Per prompt, its ambiguous pairs, the preferred kind first (alternating by prompt)."""
    dropped: Counter = Counter()
    per_prompt = []
    for i, prompt in enumerate(prompts):
        found = {}
        pair = closest_samples(samples[i]) if i in samples else None
        if pair is None:
            pass
        elif isinstance(pair, str):
            dropped[f"ambiguous_sampled: {pair}"] += 1
        else:
            chosen, rejected = weak_rule(prompt.text, *pair)
            source = f"sampled x2 (T={TEMPERATURE}, top_p={TOP_P}); weak rule"
            found["ambiguous_sampled"] = row(prompt, "ambiguous_sampled", chosen, rejected, source)
        full = greedy[i].text
        edited = None if is_degenerate(full) else edited_reply(full)
        if edited is not None and edited.strip() == full.strip():
            dropped["ambiguous_edit: edit identical to answer"] += 1
        elif edited is not None:
            chosen, rejected = weak_rule(prompt.text, full, edited)
            source = "greedy vs greedy minus one sentence; weak rule"
            found["ambiguous_edit"] = row(prompt, "ambiguous_edit", chosen, rejected, source)
        # Prompts with samples (odd positions) offer their sampled pair first.
        order = AMBIGUOUS_KINDS if i % 2 == 1 else AMBIGUOUS_KINDS[::-1]
        per_prompt.append([found[k] for k in order if k in found])
    return per_prompt, dropped


def pick_ambiguous(per_prompt: list[list[dict]], n_clear: int, share: float) -> list[dict]:
    """Takes candidates round-robin over prompts until they are ``share`` of all pairs."""
    target = round(share / (1 - share) * n_clear)
    picked: list[dict] = []
    for depth in range(max((len(c) for c in per_prompt), default=0)):
        for candidates in per_prompt:
            if len(picked) < target and depth < len(candidates):
                picked.append(candidates[depth])
    return picked


# --------------------------------------------------------------------------------------------
# Sanity check: the reference model's margin per kind
# --------------------------------------------------------------------------------------------


def margin_table(path: Path, model, tokenizer) -> str:
    """Summed log-prob margin log pi(chosen|x) - log pi(rejected|x) per kind, as Markdown."""
    pairs = load_pairs(path).pairs
    encoded, _ = encode_pairs(pairs, tokenizer)
    chosen, rejected = score_pairs(
        model, encoded, tokenizer.pad_token_id, batch_size=8, desc="scoring"
    )
    margins = (chosen.sum_logps - rejected.sum_logps).tolist()
    per_token = (chosen.mean_logps - rejected.mean_logps).tolist()
    by_kind: dict[str, list[float]] = {}
    by_kind_mean: dict[str, list[float]] = {}
    for pair, m, t in zip(pairs, margins, per_token, strict=True):
        by_kind.setdefault(pair.metadata["kind"], []).append(m)
        by_kind_mean.setdefault(pair.metadata["kind"], []).append(t)
    lines = [
        "| kind | pairs | mean margin | median abs margin | mean abs margin | margin > 0 "
        "| mean abs per-token margin |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = list(ALL_KINDS)
    for kind in sorted(by_kind, key=lambda k: order.index(k) if k in order else len(order)):
        ms = by_kind[kind]
        abs_ms = [abs(m) for m in ms]
        positive = sum(m > 0 for m in ms) / len(ms)
        lines.append(
            f"| {kind} | {len(ms)} | {statistics.fmean(ms):+.1f} | "
            f"{statistics.median(abs_ms):.1f} | {statistics.fmean(abs_ms):.1f} | {positive:.0%} | "
            f"{statistics.fmean(abs(t) for t in by_kind_mean[kind]):.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSONL")
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="prompt file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ambiguous-share", type=float, default=0.28)
    parser.add_argument("--answers", type=Path, default=None, help="also save raw answers here")
    parser.add_argument(
        "--from-answers", type=Path, default=None, help="label saved raw answers, no generation"
    )
    parser.add_argument("--score", action="store_true", help="print the margin table afterwards")
    parser.add_argument("--score-only", action="store_true", help="only score --out")
    return parser.parse_args(argv)


def generate_answers(
    args: argparse.Namespace, prompts: list[Prompt], model, tokenizer
) -> tuple[list[Answer], dict[int, list[Answer]]]:
    """Greedy answers for all prompts, samples for those that use them (raw, uncleaned)."""
    tick = time.perf_counter()
    greedy = generate(
        model, tokenizer, prompts, args.batch_size, args.max_new_tokens, False, args.seed
    )
    greedy = [answers[0] for answers in greedy]
    log.info("greedy answers in %.0f s", time.perf_counter() - tick)
    # Sampling costs three answers a prompt, so only the prompts that use samples get them.
    sampled = [i for i, a in enumerate(greedy) if i % 2 == 1 or is_degenerate(clean(a).text)]
    tick = time.perf_counter()
    answers = generate(
        model,
        tokenizer,
        [prompts[i] for i in sampled],
        args.batch_size,
        args.max_new_tokens,
        True,
        args.seed,
    )
    log.info("sampled answers for %d prompts in %.0f s", len(sampled), time.perf_counter() - tick)
    return greedy, dict(zip(sampled, answers, strict=True))


def save_answers(path: Path, prompts, greedy, samples) -> None:
    rows = [
        {
            "prompt_id": p.id,
            "prompt": p.text,
            "greedy": vars(greedy[i]),
            "samples": [vars(a) for a in samples.get(i, [])],
        }
        for i, p in enumerate(prompts)
    ]
    write_jsonl(path, rows)


def load_answers(path: Path, prompts: list[Prompt]):
    """Reads a ``--answers`` dump back; it must hold exactly the current prompts."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if [r["prompt"] for r in rows] != [p.text for p in prompts]:
        raise SystemExit(f"{path}: its prompts differ from --prompts/--limit; regenerate it")
    greedy = [Answer(**r["greedy"]) for r in rows]
    samples = {i: [Answer(**a) for a in r["samples"]] for i, r in enumerate(rows) if r["samples"]}
    return greedy, samples


def build(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    """Generates (or reads) the answers and labels them; returns the rows in file order."""
    prompts = read_prompts(args.prompts)[: args.limit]
    log.info("%d prompts from %s", len(prompts), args.prompts)
    if args.from_answers:
        greedy, samples = load_answers(args.from_answers, prompts)
    else:
        greedy, samples = generate_answers(args, prompts, model, tokenizer)
        if args.answers:
            save_answers(args.answers, prompts, greedy, samples)
    log.info("greedy answers: %d hit the token limit", sum(not a.finished for a in greedy))
    greedy = [clean(a) for a in greedy]
    samples = {i: [clean(a) for a in answers] for i, answers in samples.items()}
    log.info("greedy answers: %d degenerate", sum(is_degenerate(a.text) for a in greedy))

    clear, dropped = clear_pairs(prompts, greedy, samples, args.seed)
    candidates, dropped_ambiguous = ambiguous_candidates(prompts, greedy, samples)
    ambiguous = pick_ambiguous(candidates, len(clear), args.ambiguous_share)
    dropped.update(dropped_ambiguous)
    for reason, n in sorted(dropped.items()):
        log.info("dropped (%s): %d", reason, n)
    # Grouped by prompt so related pairs sit together in the file.
    position = {p.id: n for n, p in enumerate(prompts)}
    return sorted(
        clear + ambiguous, key=lambda r: (position[r["prompt_id"]], ALL_KINDS.index(r["kind"]))
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not 0 <= args.ambiguous_share < 1:
        raise SystemExit("--ambiguous-share must be in [0, 1)")
    started = time.perf_counter()
    needs_model = args.score or args.score_only or not args.from_answers
    model, tokenizer = EmbeddedSmolLM2().load() if needs_model else (None, None)
    if needs_model:
        log.info("model loaded in %.0f s", time.perf_counter() - started)
    if not args.score_only:
        rows = build(args, model, tokenizer)
        write_jsonl(args.out, rows)
        counts = Counter(r["kind"] for r in rows)
        size = args.out.stat().st_size
        log.info("wrote %d pairs to %s (%d bytes)", len(rows), args.out, size)
        for kind in ALL_KINDS:
            log.info("  %-18s %4d", kind, counts.get(kind, 0))
        share = sum(counts[k] for k in AMBIGUOUS_KINDS) / max(1, len(rows))
        log.info("  ambiguous share    %.0f%%", 100 * share)
        log.info("generation and labelling took %.0f s", time.perf_counter() - started)
    if args.score or args.score_only:
        tick = time.perf_counter()
        print(margin_table(args.out, model, tokenizer))
        log.info("scoring took %.0f s", time.perf_counter() - tick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
