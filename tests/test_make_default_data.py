"""experiments/make_default_data.py without a model: the labelling rule and a --from-answers run.

Covered:

* the rule's text helpers (``is_degenerate``, ``truncated_reply``, ``repetitive_reply``,
  ``edited_reply``, ``weak_rule``, ``closest_samples``, ``clean``) on hand-computed examples,
  boundaries included (the 60% trigram threshold, the 6-word and 12-word limits, the 85% length
  ratio, ties);
* the ``--answers`` file format (``save_answers`` / ``load_answers``) and its prompt check;
* ``pick_ambiguous``'s target count;
* an end-to-end ``main([... --from-answers ...])`` on a six-prompt file with hand-written answers,
  with the model class replaced by one that fails when built: the row schema, the pairs each prompt
  yields, chosen != rejected, the ambiguous share, and byte-identical output across two runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from compo.data import load_pairs

# The script lives in experiments/ (not an installed package): import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import make_default_data as mdd
from experiments.make_default_data import (
    Answer,
    clean,
    closest_samples,
    edited_reply,
    is_degenerate,
    repetitive_reply,
    truncated_reply,
    weak_rule,
)

# --------------------------------------------------------------------------------------------
# The rule's text helpers
# --------------------------------------------------------------------------------------------


def periodic(period: int, length: int) -> str:
    """A text of ``length`` distinct-letter words cycling with the given period.

    Args:
        period: How many different words the cycle has.
        length: How many words the text has.

    Returns:
        Words such as ``"a b c a b c a"``: its trigrams repeat with the same period, so exactly
        ``min(period, length - 2)`` of its ``length - 2`` trigrams are distinct.
    """
    return " ".join("abcdefghij"[k % period] for k in range(length))


def test_is_degenerate_threshold_is_sixty_percent_distinct_trigrams():
    # 12 words -> 10 trigrams; period 6 -> 6/10 = 60% distinct (not below), period 5 -> 50%.
    assert not is_degenerate(periodic(6, 12))
    assert is_degenerate(periodic(5, 12))
    # The docstring's example loop: 16 tokens (":" is one), 14 trigrams, 4 distinct.
    assert is_degenerate("Boil an egg: Boil an egg: Boil an egg: Boil an egg:")
    assert not is_degenerate("The quick brown fox jumps over the lazy dog today.")
    # Case is ignored: the same loop in mixed case is still a loop.
    assert is_degenerate("Go on, GO ON, go on, Go On, go on, gO oN, go on,")
    # Fewer than 8 trigrams is too short to call a loop.
    assert not is_degenerate("a a a a a a a a a")
    assert is_degenerate("a a a a a a a a a a")


def test_truncated_reply_halves_the_last_sentence_rounding_down():
    # Last sentence of 7 words -> its first 3 words are kept; earlier sentences untouched.
    text = "Paris is the capital. It is a large and beautiful city."
    assert truncated_reply(text) == "Paris is the capital. It is a"
    # Exactly 6 words is enough: 3 kept.
    assert truncated_reply("One two three four five six.") == "One two three"
    # 8 words -> 4 kept, and a last sentence without final punctuation still counts.
    assert truncated_reply("Hello there. a b c d e f g h") == "Hello there. a b c d"


def test_truncated_reply_needs_six_words_in_the_last_sentence():
    assert truncated_reply("One two three four five.") is None
    # Only the last sentence counts, however long the others are.
    assert truncated_reply("This first sentence has many many words in it. Short one here.") is None
    assert truncated_reply("") is None


def test_repetitive_reply_repeats_the_first_sentence_four_times():
    text = "Paris is the capital of France. It is big."
    first = "Paris is the capital of France."
    assert repetitive_reply(text) == " ".join([first] * 4)
    # Exactly 12 words: the whole sentence is still used.
    twelve = "a1 a2 a3 a4 a5 a6 a7 a8 a9 a10 a11 a12."
    assert repetitive_reply(twelve + " Next.") == " ".join([twelve] * 4)
    # No sentence end at all: the whole text is the first sentence.
    assert repetitive_reply("hello world again") == "hello world again " * 3 + "hello world again"


def test_repetitive_reply_uses_eight_words_of_a_long_first_sentence():
    text = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13. Second sentence."
    assert repetitive_reply(text) == " ".join(["w1 w2 w3 w4 w5 w6 w7 w8"] * 4)


def test_repetitive_reply_skips_a_first_clause_under_three_words():
    assert repetitive_reply("Yes. It is what it is.") is None


def test_edited_reply_drops_the_shortest_sentence_after_the_first():
    # The first sentence ("Hi.") is the shortest but is never dropped.
    assert edited_reply("Hi. Hello there friend. How are you doing today?") == (
        "Hi. How are you doing today?"
    )
    # A middle sentence goes together with the space before it.
    assert edited_reply("One. Two two. Three three three.") == "One. Three three three."
    # The last one can go too.
    assert edited_reply("A b. Cc dd ee. F g h i. J.") == "A b. Cc dd ee. F g h i."


def test_edited_reply_drops_the_later_sentence_on_ties():
    assert edited_reply("First sentence here. Ab. Cd. Longer one here.") == (
        "First sentence here. Ab. Longer one here."
    )


def test_edited_reply_needs_two_sentences():
    assert edited_reply("Only one sentence here.") is None
    assert edited_reply("no sentence end at all") is None


def test_weak_rule_prefers_a_reply_ending_in_punctuation():
    # Ending with ".!?" beats both topic words and length.
    prompt = "Describe the ocean waves."
    done, cut = "It is nice.", "Ocean waves roll in from the ocean"
    assert weak_rule(prompt, cut, done) == (done, cut)
    assert weak_rule(prompt, "Great!  ", "Great") == ("Great!  ", "Great")  # trailing space ok


def test_weak_rule_then_prompt_content_words_then_length():
    prompt = "Describe the OCEAN waves."  # content words: describe, ocean, waves
    on_topic, off_topic = "Waves roll in from the ocean all day.", "They move."
    assert weak_rule(prompt, off_topic, on_topic) == (on_topic, off_topic)
    # Stop words ("the", "what", ...) are not topic words: a tie, so the shorter reply wins.
    long, short = "The sea is blue and very deep.", "The sea is blue."
    assert weak_rule(prompt, long, short) == (short, long)
    assert weak_rule("What the?", "What the heck is that.", "It is.") == (
        "It is.",
        "What the heck is that.",
    )


def test_weak_rule_is_total_and_symmetric():
    assert weak_rule("Say something.", "Bbb.", "Aaa.") == ("Aaa.", "Bbb.")
    assert weak_rule("Say something.", "Aaa.", "Bbb.") == ("Aaa.", "Bbb.")


def words(n: int, tag: str = "w") -> str:
    """A sentence of ``n`` distinct words (so it is never degenerate).

    Args:
        n: Word count.
        tag: Prefix that keeps texts of the same length distinct.

    Returns:
        ``"w0 w1 ... w{n-1}."`` with ``tag`` in place of ``w``.
    """
    return " ".join(f"{tag}{k}" for k in range(n)) + "."


def samples(*texts: str) -> list[Answer]:
    """Finished answers with the given texts.

    Args:
        *texts: The answers' texts.

    Returns:
        One finished :class:`Answer` per text.
    """
    return [Answer(t, True) for t in texts]


def test_closest_samples_picks_the_pair_closest_in_word_count():
    a, b, c = words(3, "a"), words(10, "b"), words(9, "c")
    assert closest_samples(samples(a, b, c)) == (b, c)  # 10 vs 9 words
    # Equally close pairs: the first in combination order wins.
    x, y, z = words(10, "x"), words(11, "y"), words(12, "z")
    assert closest_samples(samples(x, y, z)) == (x, y)


def test_closest_samples_length_ratio_boundary():
    # 17 / 20 = 0.85 exactly is kept; 16 / 20 is not.
    pair = (words(17, "a"), words(20, "b"))
    assert closest_samples(samples(*pair)) == pair
    assert closest_samples(samples(words(16, "a"), words(20, "b"))) == (
        "no two samples of similar length"
    )
    # The closest pair is 5 vs 10 words: too different, even though other pairs exist.
    assert closest_samples(samples(words(5), words(10), words(20))) == (
        "no two samples of similar length"
    )


def test_closest_samples_skips_degenerate_and_identical_samples():
    loop = "Boil an egg: Boil an egg: Boil an egg: Boil an egg:"
    good1, good2 = words(9, "a"), words(10, "b")
    assert closest_samples(samples(loop, good1, good2)) == (good1, good2)
    reason = "fewer than two distinct non-degenerate samples"
    assert closest_samples(samples(good1, good1 + " ", loop)) == reason
    assert closest_samples(samples(loop, loop, good1)) == reason


def test_clean_cuts_an_unfinished_answer_to_its_last_sentence():
    assert clean(Answer("Paris is the capital. It has many", False)) == Answer(
        "Paris is the capital.", False
    )
    # A closing quote belongs to the sentence.
    assert clean(Answer('He said "yes." Then he', False)).text == 'He said "yes."'


def test_clean_falls_back_to_the_last_complete_line():
    poem = "Roses are red\nViolets are blue\nSugar is"
    assert clean(Answer(poem, False)).text == "Roses are red\nViolets are blue"
    # A "1." list marker is not a sentence end, so the list is cut by lines.
    assert clean(Answer("Steps:\n1. Boil\n2. Eat the", False)).text == "Steps:\n1. Boil"


def test_clean_keeps_finished_answers_and_text_without_a_cut_point():
    finished = Answer("It has many", True)
    assert clean(finished) == finished
    assert clean(Answer("just some words", False)) == Answer("just some words", False)


# --------------------------------------------------------------------------------------------
# The answers file and the ambiguous share
# --------------------------------------------------------------------------------------------


def test_answers_file_round_trip_and_prompt_check(tmp_path):
    prompts = [mdd.Prompt("p001", "facts", "Q1?"), mdd.Prompt("p002", "facts", "Q2?")]
    greedy = [Answer("A one.", True), Answer("A two", False)]
    sampled = {1: samples("S1.", "S2.", "S3.")}
    path = tmp_path / "answers.jsonl"
    mdd.save_answers(path, prompts, greedy, sampled)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {
        "prompt_id": "p001",
        "prompt": "Q1?",
        "greedy": {"text": "A one.", "finished": True},
        "samples": [],
    }
    assert mdd.load_answers(path, prompts) == (greedy, sampled)
    with pytest.raises(SystemExit, match="prompts differ"):
        mdd.load_answers(path, prompts[:1])


def test_pick_ambiguous_target_and_round_robin():
    per_prompt = [[{"id": f"{p}{k}"} for k in "ab"] for p in "xyz"]
    # 0.25 / 0.75 * 6 clear = 2 ambiguous, taken from the first depth of each prompt.
    assert [r["id"] for r in mdd.pick_ambiguous(per_prompt, 6, 0.25)] == ["xa", "ya"]
    # 0.5 / 0.5 * 5 = 5: one full round, then the second round until the target.
    picked = mdd.pick_ambiguous(per_prompt, 5, 0.5)
    assert [r["id"] for r in picked] == ["xa", "ya", "za", "xb", "yb"]
    # 0.4 / 0.6 * 4 = 2.67 rounds to 3 (not down to 2).
    assert len(mdd.pick_ambiguous(per_prompt, 4, 0.4)) == 3
    assert mdd.pick_ambiguous(per_prompt, 6, 0.0) == []
    assert len(mdd.pick_ambiguous(per_prompt, 100, 0.5)) == 6  # no more than there are


# --------------------------------------------------------------------------------------------
# End to end: main --from-answers, no model
# --------------------------------------------------------------------------------------------

PROMPTS_TEXT = """\
# two categories, three prompts each
## facts
What is the capital of France?
How many legs does a spider have?
What gas do plants absorb from the air?
## cooking
How do you boil an egg?
Name a common spice used in baking.
How long should pasta cook?
"""

LOOP = "Boil an egg: Boil an egg: Boil an egg: Boil an egg: Boil an egg:"
SPIDER = (
    "A spider has eight legs. Each leg has seven segments. "
    "Spiders use them to walk and sense vibrations."
)
GREEDY = [
    Answer("The capital of France is Paris. It is known for the Eiffel Tower and museums.", True),
    Answer(SPIDER + " They also", False),  # hit the token limit: cleaned back to SPIDER
    Answer("Plants absorb carbon dioxide. They use it with sunlight to make sugar for food.", True),
    Answer(LOOP, True),  # degenerate
    Answer("Cinnamon is a common baking spice. It adds a warm sweet flavor to cakes.", True),
    Answer("Pasta cooks in eight to twelve minutes. Check the package and taste it often.", True),
]
SAMPLES = {
    1: samples(
        "Spiders have eight legs.",
        "A spider has eight legs in total.",
        "The spider walks on eight legs.",
    ),
    3: samples(
        LOOP,
        "Put the egg in boiling water for about nine minutes, then cool it.",
        "Place the egg in boiling water and cook it for ten minutes.",
    ),
    5: samples(
        "Most pasta needs about ten minutes.",
        "Cook dried pasta for roughly ten minutes.",
        "Boil it until tender.",
    ),
}


def run_main(tmp_path: Path, out_name: str, *extra: str) -> Path:
    """Runs ``main`` with ``--from-answers`` on the six test prompts; returns the output path.

    Args:
        tmp_path: Where the prompt, answers and output files go.
        out_name: Output file name.
        *extra: More command-line arguments.

    Returns:
        The written JSONL file.
    """
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(PROMPTS_TEXT, encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    if not answers.exists():
        mdd.save_answers(answers, mdd.read_prompts(prompts_file), GREEDY, SAMPLES)
    out = tmp_path / out_name
    argv = ["--prompts", str(prompts_file), "--from-answers", str(answers), "--out", str(out)]
    assert mdd.main([*argv, "--seed", "0", *extra]) == 0
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Makes any attempt to build the real model fail the test."""

    class NoModel:
        def __init__(self, *args, **kwargs):
            raise AssertionError("--from-answers must not load the model")

    monkeypatch.setattr(mdd, "EmbeddedSmolLM2", NoModel)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file.

    Args:
        path: The file.

    Returns:
        One dict per line.
    """
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_from_answers_writes_the_documented_pairs(tmp_path, no_model):
    out = run_main(tmp_path, "pairs.jsonl")
    rows = read_rows(out)
    schema = ["id", "prompt", "chosen", "rejected", "kind", "category", "prompt_id", "source"]
    assert all(list(r) == schema for r in rows)
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
    assert all(r["kind"] in mdd.ALL_KINDS for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["source"].startswith("smollm2-135m-instruct ") for r in rows)
    by_id = {r["id"]: r for r in rows}

    # Clear pairs: two per good prompt (kinds in turn from position i), one for the degenerate p004.
    clear = sorted(r["id"] for r in rows if r["kind"] not in mdd.AMBIGUOUS_KINDS)
    assert clear == [
        "p001-off_topic",
        "p001-truncated",
        "p002-repetitive",
        "p002-truncated",
        "p003-off_topic",
        "p003-repetitive",
        "p004-degenerate",
        "p005-repetitive",
        "p005-truncated",
        "p006-off_topic",
        "p006-repetitive",
    ]
    # The unfinished answer was cut to its last sentence; truncation keeps 4 of 8 last words.
    assert by_id["p002-truncated"]["chosen"] == SPIDER
    assert by_id["p002-truncated"]["rejected"] == (
        "A spider has eight legs. Each leg has seven segments. Spiders use them to"
    )
    assert by_id["p002-repetitive"]["rejected"] == " ".join(["A spider has eight legs."] * 4)
    # Degenerate greedy answer: the first non-degenerate sample beats it.
    assert by_id["p004-degenerate"]["chosen"] == SAMPLES[3][1].text
    assert by_id["p004-degenerate"]["rejected"] == LOOP
    # Off-topic: the greedy answer to a good prompt of the other category.
    cooking_good = {GREEDY[4].text, GREEDY[5].text}
    facts_good = {GREEDY[0].text, SPIDER, GREEDY[2].text}
    assert by_id["p001-off_topic"]["rejected"] in cooking_good
    assert by_id["p003-off_topic"]["rejected"] in cooking_good
    assert by_id["p006-off_topic"]["rejected"] in facts_good
    assert by_id["p006-off_topic"]["category"] == "cooking"

    # Ambiguous: round(0.28 / 0.72 * 11) = 4, one per prompt in turn, sampled first at odd i.
    ambiguous = [r["id"] for r in rows if r["kind"] in mdd.AMBIGUOUS_KINDS]
    assert ambiguous == [
        "p001-ambiguous_edit",
        "p002-ambiguous_sampled",
        "p003-ambiguous_edit",
        "p004-ambiguous_sampled",
    ]
    assert len(ambiguous) / len(rows) == pytest.approx(0.28, abs=0.5 / len(rows))
    # The edit drops the only sentence after the first; the complete, shorter reply wins.
    edit = by_id["p001-ambiguous_edit"]
    assert {edit["chosen"], edit["rejected"]} == {GREEDY[0].text, "The capital of France is Paris."}
    # Closest samples: 7 and 6 words. Both end with "." and hold "spider" and "legs" of the
    # prompt, so the shorter wins (31 vs 33 characters), though the other sorts first.
    sampled = by_id["p002-ambiguous_sampled"]
    assert (sampled["chosen"], sampled["rejected"]) == (
        "The spider walks on eight legs.",
        "A spider has eight legs in total.",
    )

    # Rows are grouped by prompt and the file loads as preference pairs.
    assert [r["prompt_id"] for r in rows] == sorted(r["prompt_id"] for r in rows)
    assert len(load_pairs(out).pairs) == len(rows)


def test_from_answers_is_byte_identical_across_runs(tmp_path, no_model):
    first = run_main(tmp_path, "a.jsonl").read_bytes()
    second = run_main(tmp_path, "b.jsonl").read_bytes()
    assert first == second and first


def test_ambiguous_share_zero_gives_clear_pairs_only(tmp_path, no_model):
    rows = read_rows(run_main(tmp_path, "clear.jsonl", "--ambiguous-share", "0"))
    assert len(rows) == 11
    assert not any(r["kind"] in mdd.AMBIGUOUS_KINDS for r in rows)


def test_degenerate_answer_without_samples_is_dropped_not_a_crash():
    prompts = [mdd.Prompt("p001", "facts", "Q?"), mdd.Prompt("p002", "facts", "R?")]
    greedy = [Answer(LOOP, True), Answer("A fine answer here.", True)]
    rows, dropped = mdd.clear_pairs(prompts, greedy, {}, seed=0)
    assert not any(r["kind"] == "degenerate" for r in rows) and sum(dropped.values()) >= 1
