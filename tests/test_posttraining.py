"""Post-training's measures and data (issue 25): the coding task built from a fake package, HumanEval asked in the
chat format scoring the canonical solutions 164/164, the loop detector, execution-judged coding pairs."""

import json
import textwrap

import pytest

import chat
import eval as ev
import sandbox

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


def chat_canonical(problems, n, temperature):
    """Answers as a chat model would give them: odd problems the whole function (prompt and canonical solution) in a
    ```python block with a closing remark, even ones the body alone in a bare ``` block."""
    answers = [
        chat.CODE_ANSWER.format(code=p["prompt"] + p["canonical_solution"]) + "\nThis passes the tests."
        if i % 2
        else "```\n" + p["canonical_solution"] + "```"
        for i, p in enumerate(problems)
    ]
    return [[ev.answer_completion(a)] * n for a in answers]


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
    wrong = lambda ps, n, t: [[ev.answer_completion("```python\n    return None\n```")] * n for _ in ps]  # noqa: E731
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
