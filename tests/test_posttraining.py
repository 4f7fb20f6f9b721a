"""Post-training's measures and data (issue 25): the coding task built from a fake package, HumanEval asked in the
chat format scoring the canonical solutions 164/164, the loop detector, execution-judged coding pairs."""

import json
import re
import textwrap
import time

import pytest
from conftest import run

import chat
import eval as ev
import generation
import sandbox
from tokenizer import load_tokenizer

FAKE_MODULE = '''
import math
import os.path
import numpy as np


def hypot2(a, b):
    """Return the length of the hypotenuse of a right triangle with legs a and b.

    >>> hypot2(3, 4)
    5.0
    """
    return math.sqrt(a * a + b * b)


def stem(path):
    """Return the file name of path without its folder and its extension."""
    return os.path.splitext(os.path.basename(path))[0]


def mean(values):
    """Return the arithmetic mean of values as a NumPy float."""
    return np.mean(values)


def uses_helper(x):
    """Return x passed through this module's private helper, twice over."""
    return _helper(_helper(x))


def todo(x):
    """Not written yet: the body only raises, so there is nothing to learn."""
    raise NotImplementedError


def _private(x):
    """A private function with a long enough docstring, never asked."""
    return x


class Box:
    def area(self):
        """Return the area of the box from its width and its height."""
        return self.width * self.height
'''


def fake_rows():
    return [
        {"name": "site-packages/fakepkg/geometry.py", "text": FAKE_MODULE},
        {"name": "site-packages/fakepkg/tests/test_geometry.py", "text": FAKE_MODULE},  # tests are not asked
        {"name": "site-packages/fakepkg/broken.py", "text": "def f(:\n"},  # does not parse: counted
    ]


def test_coding_task_from_a_fake_package():
    conversations, counts = chat.code_conversations(fake_rows())
    by_name = {c[0]["function"]: c for c in conversations}
    assert sorted(by_name) == ["hypot2", "stem"]  # numpy, a module helper, a stub, private, a method: left out
    assert counts["not_self_contained"] == 2 and counts["stubs"] == 1
    assert counts["not_modules"] == 1 and counts["unparsed"] == 1
    question, answer = by_name["hypot2"]
    # the request is HumanEval's shape: the imports it needs, then the signature and docstring, in a python block
    assert question["content"] == chat.CODE_REQUEST.format(
        prompt="import math\n\n\ndef hypot2(a, b):\n"
        + textwrap.indent(
            '"""Return the length of the hypotenuse of a right triangle with legs a and b.\n\n>>> hypot2(3, 4)\n'
            '5.0\n"""\n',
            "    ",
        )
    )
    code = chat.code_block(answer["content"])
    assert code.startswith("import math\n\n\ndef hypot2(a, b):") and code.endswith("return math.sqrt(a * a + b * b)\n")
    namespace = {}
    exec(compile(code, "answer", "exec"), namespace)  # our own fixture's code, not a model's: safe to run here
    assert namespace["hypot2"](3, 4) == 5.0
    assert question["doc"] and ">>> hypot2(3, 4)" in question["doc"]  # its examples can judge answers
    assert by_name["stem"][0]["doc"] is None and "import os.path" in by_name["stem"][1]["content"]
    # scope=all: the third-party and helper functions and the method too; never the stub or the private one
    everything, _ = chat.code_conversations(fake_rows(), scope="all")
    assert sorted(c[0]["function"] for c in everything) == ["area", "hypot2", "mean", "stem", "uses_helper"]


def test_doctests_judge_answers_in_the_sandbox():
    conversations, _ = chat.code_conversations(fake_rows())
    question, answer = next(c for c in conversations if c[0]["function"] == "hypot2")
    right = chat.code_block(answer["content"])
    wrong = right.replace("a * a + b * b", "a + b")
    assert sandbox.passes_doctests(right, "hypot2", question["doc"])
    assert not sandbox.passes_doctests(wrong, "hypot2", question["doc"])
    assert not sandbox.passes_doctests("x = 1\n", "hypot2", question["doc"])  # no function of that name


def hypot2_answers():
    """The coding requests of fake_rows (hypot2's, stem's), hypot2's real answer, a right and a wrong one of its
    own, and hypot2's request with examples that its real function fails."""
    coding, _ = chat.code_conversations(fake_rows())
    (hyp_q, real), (stem_q, _) = sorted(coding, key=lambda c: c[0]["function"])
    right = real["content"].replace("math.sqrt(a * a + b * b)", "math.hypot(a, b)")
    wrong = real["content"].replace("a * a + b * b", "a + b")
    broken = dict(hyp_q, doc=hyp_q["doc"].replace("5.0", "6.0"))
    return hyp_q, real, stem_q, right, wrong, broken


def test_on_policy_pairs_are_judged_by_doctests_while_the_next_batch_is_written(sft_run, monkeypatch):
    """prepare.py --sample_from's pairs (generation.sampled_code_pairs), the run's answers set by the test: an answer
    equal to the real function is dropped, one that passes the examples is dropped, one that fails them is rejected,
    a real function that fails its own examples keeps a plain pair, a request without examples is not run, and a
    conversation that is not a coding request keeps its pair. The first batch's examples run before the last batch
    is generated."""
    sft, _ = sft_run
    tok = load_tokenizer(sft / "tokenizer.model")
    hyp_q, real, stem_q, right, wrong, broken = hypot2_answers()
    asked = [hyp_q, hyp_q, hyp_q, broken, stem_q]
    answers = [real["content"], right, wrong, wrong, "```python\ndef stem(path):\n    return path\n```"]
    assert tok.decode(tok.encode(real["content"])) == real["content"]  # "equal" survives the round trip
    conversations = [[dict(q, content=q["content"] + f" (#{k})"), real] for k, q in enumerate(asked)]
    conversations.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    pairs = [{"prompt": c[0]["content"], "chosen": c[1]["content"], "rejected": "old"} for c in conversations]
    started, batches = [], []

    def answering(model, cache, step, prompts, *rest):  # generate_batch, the answers the test wants
        batches.append(len(prompts))
        deadline = time.time() + 20
        while len(batches) == 3 and not started and time.time() < deadline:
            time.sleep(0.01)  # the last batch: the first batches' examples run meanwhile
        assert len(batches) < 3 or started, "no doctest had started while the last batch was written"
        return [(tok.encode(answers[int(re.search(r"\(#(\d)\)", tok.decode(p))[1])]), True) for p in prompts]

    monkeypatch.setattr(generation, "generate_batch", answering)
    monkeypatch.setattr(generation, "passes_doctests", lambda *a: started.append(a[1]) or sandbox.passes_doctests(*a))
    judged, summary = generation.sampled_code_pairs(sft, conversations, pairs, max_new=8, batch_size=2)
    assert batches == [2, 2, 1]
    assert judged[0] is None and judged[1] is None  # equal to the real function; passes the examples
    assert [judged[k]["rejected"] for k in (2, 3, 4)] == answers[2:]
    assert judged[2]["chosen"] == real["content"] and judged[5] == pairs[5]
    assert started == ["hypot2"] * 5  # right: real + answer; wrong: real + answer; broken: its real only
    assert "5 answers" in summary and "1 equal" in summary and "3 judged" in summary
    assert "1 passing answers dropped" in summary and "1 whose real function fails" in summary


@pytest.mark.parametrize(
    "unjudged, own_only, others, per_request",
    [("own", False, "written", 1), ("written", False, "written", 1), ("written", True, "written", 1)]
    + [("written", True, "none", 3)],
)
def test_sample_n_pairs_a_passing_answer_of_the_run_against_a_failing_one(
    sft_run, monkeypatch, unjudged, own_only, others, per_request
):
    """--sample_n=3: each request with examples is answered twice more at T=0.8 and every answer judged; where the
    run's answers both pass and fail, a passing one is chosen over a failing one (its greedy answer among them);
    where none passes, the plain pair stays; where all pass, none; a real function failing its examples keeps its
    plain pair, and a request without examples is asked once. --sample_unjudged=written: those last two keep their
    written pair, and the request without examples is not asked. --sample_own_only: only the two pairs of the run's
    own answers replace written pairs; with --sample_others=none every other pair is dropped, and --sample_pairs=3
    gives a request one pair per distinct answer of its longer side."""
    sft, _ = sft_run
    tok = load_tokenizer(sft / "tokenizer.model")
    hyp_q, real, stem_q, right, wrong, broken = hypot2_answers()
    wrong2 = real["content"].replace("a * a + b * b", "a * b")
    asked = [hyp_q, hyp_q, hyp_q, hyp_q, broken, stem_q]
    greedy = [wrong, right, wrong, real["content"], wrong, "```python\ndef stem(path):\n    return path\n```"]
    plus_one = real["content"].replace("math.sqrt(a * a + b * b)", "math.sqrt(a * a + b * b) + 1")  # 6.0: "broken"
    drawn = {0: [wrong2, right], 1: [wrong2, wrong2], 2: [wrong2, wrong2], 3: [right, right], 4: [plus_one, wrong2]}
    conversations = [[dict(q, content=q["content"] + f" (#{k})"), real] for k, q in enumerate(asked)]
    pairs = [{"prompt": c[0]["content"], "chosen": c[1]["content"], "rejected": "old"} for c in conversations]
    temperatures = []

    def answering(model, cache, step, prompts, max_new, stop_ids, tok_, stop_texts, temperature, top_p, generator):
        temperatures.extend([temperature] * len(prompts))
        ks = [int(re.search(r"\(#(\d)\)", tok.decode(p))[1]) for p in prompts]
        return [(tok.encode(drawn[k].pop(0) if temperature else greedy[k]), True) for k in ks]

    def streaming(model, prompts, max_new, stop_ids, temperature, top_p, seed, rows, desc, on_done):
        assert seed == 1337 and rows == 4  # the samples' stream: one seed, sample_batch rows
        for i, result in enumerate(
            answering(model, None, None, prompts, max_new, stop_ids, None, (), temperature, top_p, None)
        ):
            on_done(i, result)

    monkeypatch.setattr(generation, "generate_batch", answering)
    monkeypatch.setattr(generation, "generate_stream", streaming)
    judged, summary = generation.sampled_code_pairs(
        sft, conversations, pairs, max_new=8, batch_size=4, samples=3, unjudged=unjudged, own_only=own_only,
        per_request=per_request, others=others,
    )  # fmt: skip
    written = unjudged == "written" or own_only
    assert temperatures == [0.0] * (6 - written) + [0.8] * 10  # 5 requests with examples, twice more each
    if per_request > 1:  # greedy wrong, samples wrong2 and right: each failing answer against the one passing
        assert [(p["chosen"], p["rejected"]) for p in judged[0]] == [(right, wrong), (right, wrong2)]
        assert [(p["chosen"], p["rejected"]) for p in judged[1]] == [(right, wrong2)]  # wrong2 twice: one pair
        assert judged[2:] == [None] * 4  # the others dropped
        assert "3 pairs of the run's own answers" in summary and "(2 requests, up to 3 pairs each)" in summary
        assert summary.endswith("every other pair dropped")
        data, counts, _ = chat.render_dpo(tok, judged, 1024, lambda i: "val" if i == 1 else "train")
        assert counts["kept"] == 3 and [len(data[s]["lengths"]) // 3 for s in ("train", "val")] == [2, 1]
        return
    assert (judged[0]["chosen"], judged[0]["rejected"]) == (right, wrong)  # greedy fails, a sample passes
    assert (judged[1]["chosen"], judged[1]["rejected"]) == (right, wrong2)  # greedy passes, a sample fails
    if own_only:  # none passes, all pass: the written pairs
        assert judged[2] == pairs[2] and judged[3] == pairs[3] and summary.endswith("only those replace written pairs")
    else:
        assert (judged[2]["chosen"], judged[2]["rejected"]) == (real["content"], wrong)  # none passes: the plain pair
        assert judged[3] is None  # all pass
    if written:  # no verdict: the written pairs, as prepare.py made them without --sample_from
        assert judged[4] == pairs[4] and judged[5] == pairs[5]
        assert "5 answers of " + str(sft) + " to requests with examples" in summary
    else:
        assert (judged[4]["chosen"], judged[4]["rejected"]) == (real["content"], wrong)  # broken examples: plain pair
        assert judged[5]["rejected"] == greedy[5] and judged[5]["chosen"] == real["content"]
    assert "10 more answers drawn at T=0.8: 2 pairs of the run's own answers" in summary


def chat_canonical(problems, n, temperature, ready):
    """Answers as a chat model would give them: odd problems the whole function (prompt and canonical solution) in a
    ```python block with a closing remark, even ones the body alone in a bare ``` block."""
    answers = [
        chat.CODE_ANSWER.format(code=p["prompt"] + p["canonical_solution"]) + "\nThis passes the tests."
        if i % 2
        else "```\n" + p["canonical_solution"] + "```"
        for i, p in enumerate(problems)
    ]
    for j in range(len(problems) * n):
        ready(j, ev.answer_completion(answers[j // n]))


def test_chat_format_humaneval_scores_the_canonical_solutions_164(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "samples", 0)
    monkeypatch.setattr(ev, "exec_workers", 2)
    env = {"device": "cpu"}
    result = ev.humaneval(None, None, env, tmp_path, complete=chat_canonical, chat_format=True)
    assert result["format"] == "chat" and result["problems"] == 164
    assert result["solved_greedy"] == 164, result
    lines = [json.loads(line) for line in (tmp_path / "humaneval_greedy.jsonl").read_text().splitlines()]
    assert all(line["completion"].startswith("\n") and "```" not in line["completion"] for line in lines)

    # a wrong body fails: the path does not pass everything
    def wrong(ps, n, t, ready):
        for j in range(len(ps) * n):
            ready(j, ev.answer_completion("```python\n    return None\n```"))

    monkeypatch.setattr(ev, "problems", 10)
    assert ev.humaneval(None, None, env, tmp_path, complete=wrong, chat_format=True)["solved_greedy"] == 0


def test_chat_humaneval_asks_with_the_request_template():
    problem = ev.load_problems(1)[0]
    request = chat.CODE_REQUEST.format(prompt=problem["prompt"])
    assert request.startswith("Complete the following Python function:\n```python\nfrom typing import List")
    assert request.endswith('"""\n```')


@pytest.mark.parametrize(
    "text, looping",
    [
        ("Replace fused fused fused fused fused fused", True),
        ("Return the buffer of " + "buffer_lookup_code " * 15, True),  # a word again and again: 4 words 12 times
        ("Return x x x x.", False),  # four in a row once
        ("a b c d x a b c d y a b c d", True),  # one phrase of four words, three times
        ("a b c d x a b c d", False),  # twice is not a loop
        ("Return the sum of a and b, or None when either is missing.", False),
        ("", False),
    ],
)
def test_loop_detector(text, looping):
    assert ev.is_looping(text) is looping


def test_sample_own_only_without_the_runs_answers_is_one_error_line(tmp_path, sft_run):
    """--sample_own_only needs pairs of the run's own answers: --sample_from and --sample_n >= 2; without either,
    prepare.py says so in one line before any work and writes nothing. So do --sample_others=none without
    --sample_own_only and --sample_pairs > 1 without --sample_n >= 2."""
    sft, _ = sft_run
    for keys in ([], [f"--sample_from={sft}"]):
        proc = run("prepare.py", "--mode=dpo", "--sample_own_only=true", *keys, f"--data_dir={tmp_path}/d", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        needs = "needs its run's answers: --sample_from=SFT_RUN and --sample_n=N, N >= 2; add both"
        assert proc.stderr.strip().splitlines() == [f"error: sample_own_only=true {needs}"]
        assert not (tmp_path / "d").exists()
    for keys, says in [
        (["--sample_others=none"], "sample_others=none keeps the run's own pairs alone, which --sample_own_only=true"),
        ([f"--sample_from={sft}", "--sample_pairs=4"], "sample_pairs > 1 needs several answers of the run to each"),
    ]:
        proc = run("prepare.py", "--mode=dpo", *keys, f"--data_dir={tmp_path}/d", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"error: {says}")
        assert not (tmp_path / "d").exists()
