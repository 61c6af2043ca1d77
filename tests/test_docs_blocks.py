"""Every ```python / ```bash block of README.md and docs/*.md runs as written, so the front door cannot rot.

How the blocks run, as a reader would run them:
- one working folder for the whole session (``recipes/`` linked in, outputs under it), README.md first, then the
  docs pages in name order; inside a page, its blocks in order. A page may use what the README made (its
  ``outputs/tiny-bf16`` ...); each block is a program of its own (a ``python`` block is a file run with ``python``,
  a ``bash`` block runs under ``bash -e -o pipefail``), so state passes between blocks only through files.
- the text is never edited. What makes it fast is the environment: ``HF_CAGE_DOCS_MAX_STEPS`` caps every
  ``TrainingArguments.max_steps``, ``HF_CAGE_DOCS_MAX_EVAL_SAMPLES`` caps the recipes' validation blocks and
  ``HF_CAGE_DOCS_CORPUS_PLAYS`` keeps the first few Shakespeare plays, applied by a ``sitecustomize`` module this
  test puts on ``PYTHONPATH`` (it patches each module right after Python imports it); offline, one thread.
- a block that cannot run here (``make demo``, ``pip install``, a GPU, a Hub push, a multi-process launch) is
  preceded by ``<!-- no-test: REASON -->``; blocks in measurement pages that are not marked are listed in
  :data:`UNMARKED_EXCEPTIONS`. Their number is held small (:data:`MAX_EXCEPTIONS`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_PAGES = tuple(sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")))
RUN_LANGUAGES = {"python": "python", "bash": "bash", "shell": "bash", "sh": "bash"}
# Fence labels of blocks that are not programs (output, file contents).
OTHER_LANGUAGES = {"", "text", "yaml", "json", "console", "toml", "diff", "jinja"}
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(?P<reason>\S.*?)\s*-->$")
# Blocks of pages kept by the benchmarks (their text is generated or owned there) that are not run: (page, a
# string the block contains) -> why.
UNMARKED_EXCEPTIONS = {
    ("docs/results.md", "benchmarks/accuracy.py run"): "reproduces the accuracy study: hours of CPU time",
    ("docs/results.md", "benchmarks/quadratic.py run"): "reproduces the quadratics study: about 15 CPU-minutes",
}
MAX_EXCEPTIONS = 10
# Measurement records kept by benchmarks/ and `make gpu-check`: their command listings are reproduction notes for
# those tools, so the rule that a command lives in a runnable block does not apply to them.
RECORD_PAGES = {"docs/benchmarks.md", "docs/kernels.md", "docs/results.md"}
WORD_LIMIT = 1500
SHORT_ENV = {
    "HF_CAGE_DOCS_MAX_STEPS": "4",
    "HF_CAGE_DOCS_MAX_EVAL_SAMPLES": "8",
    "HF_CAGE_DOCS_CORPUS_PLAYS": "4",
}
BLOCK_TIMEOUT_S = 600

SITECUSTOMIZE = '''
"""Shortens what the docs blocks run (tests/test_docs_blocks.py): patches modules right after they are imported."""
import importlib.abc
import os
import sys


def _cap_steps(module):
    cap = int(os.environ["HF_CAGE_DOCS_MAX_STEPS"])
    original = module.TrainingArguments.__post_init__

    def __post_init__(self):
        if self.max_steps is None or self.max_steps < 0 or self.max_steps > cap:
            self.max_steps = cap
        original(self)

    module.TrainingArguments.__post_init__ = __post_init__


def _cap_eval_samples(module):
    cap = int(os.environ["HF_CAGE_DOCS_MAX_EVAL_SAMPLES"])
    original = module.DataArguments.__post_init__

    def __post_init__(self):
        self.max_eval_samples = min(self.max_eval_samples or cap, cap)
        original(self)

    module.DataArguments.__post_init__ = __post_init__


def _few_plays(module):
    keep = int(os.environ["HF_CAGE_DOCS_CORPUS_PLAYS"])
    original = module.shakespeare_files
    module.shakespeare_files = lambda: original()[:keep]


PATCHES = {
    "transformers.training_args": _cap_steps,
    "recipe_common": _cap_eval_samples,
    "hf_cage.data.corpus": _few_plays,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
'''


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # why it is not run, or None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def fenced_blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` (relative to the repository), runnable or not, with its no-test reason."""
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.group(1), opening.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page}:{i + 1}: a fenced block that never closes"
        code = textwrap.dedent("\n".join(line[len(indent) :] if line.startswith(indent) else line
                                         for line in lines[i + 1 : end]))  # fmt: skip
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_TEST.match(before)
        skip = marker.group("reason") if marker else None
        if skip is None and language in RUN_LANGUAGES:
            skip = next((why for (p, text), why in UNMARKED_EXCEPTIONS.items() if p == page and text in code), None)
        blocks.append(Block(page, i + 1, language, code + "\n", skip))
        i = end + 1
    return blocks


def runnable(page: str) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.language in RUN_LANGUAGES]


ALL_PAGES = ("README.md", *DOC_PAGES)


def test_every_block_is_labelled_and_commands_live_in_runnable_blocks():
    """A block is ``python`` / ``bash`` (run) or labelled as not a program; a command is never hidden in a text
    block, and a no-test marker only ever precedes a runnable block."""
    command = re.compile(r"^\s*(\$ )?(python3? |hf-cage |accelerate launch |make |pip |torchrun )")
    for page in ALL_PAGES:
        for block in fenced_blocks(page):
            known = block.language in RUN_LANGUAGES or block.language in OTHER_LANGUAGES
            assert known, f"{block.where}: unknown fence label {block.language!r}"
            if block.language not in RUN_LANGUAGES and page not in RECORD_PAGES:
                assert block.skip is None, f"{block.where}: a no-test marker before a block that is not run"
                first = next((line for line in block.code.splitlines() if line.strip()), "")
                assert not command.match(first), f"{block.where}: a command in a ```{block.language} block; use bash"


def test_exceptions_stay_few_and_give_a_reason():
    skipped = [b for page in ALL_PAGES for b in runnable(page) if b.skip is not None]
    assert len(skipped) <= MAX_EXCEPTIONS, [f"{b.where}: {b.skip}" for b in skipped]
    used = {(b.page, text) for b in skipped for (p, text) in UNMARKED_EXCEPTIONS if p == b.page and text in b.code}
    assert used == set(UNMARKED_EXCEPTIONS), "an UNMARKED_EXCEPTIONS entry matches no block: remove it"
    assert runnable("README.md"), "README.md has no runnable block"


def test_readme_is_a_front_door():
    """About 1,500 words at most, and every docs page is reachable from it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.split()) <= WORD_LIMIT, f"README.md has {len(text.split())} words; move detail into docs/"
    for page in DOC_PAGES:
        if not Path(page).name.startswith("_"):
            assert f"({page}" in text, f"README.md does not link {page}"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives ``page``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    titles = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


def test_every_relative_link_resolves():
    """A link from the README or a docs page to a file of the repository (and a heading in it) exists."""
    broken = []
    for page in ALL_PAGES:
        source = REPO / page
        for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (source.parent / path).resolve() if path else source
            if not linked.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


@dataclass
class Session:
    folder: Path
    env: dict

    def run(self, block: Block) -> str | None:
        """Run ``block``; ``None`` on success, else a message with the block's place and the end of its output."""
        scripts = self.folder / ".blocks"
        scripts.mkdir(exist_ok=True)
        name = re.sub(r"\W", "_", block.where)
        if RUN_LANGUAGES[block.language] == "python":
            script = scripts / f"{name}.py"
            script.write_text(block.code, encoding="utf-8")
            argv = [sys.executable, str(script)]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        try:
            result = subprocess.run(
                argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"{block.where}: still running after {BLOCK_TIMEOUT_S} s"
        if result.returncode == 0:
            return None
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        return f"{block.where} ({block.language}) exited {result.returncode}:\n{block.code}---\n{tail}"

    def run_page(self, page: str) -> list[str]:
        failures = []
        for block in runnable(page):
            if block.skip is None and (failure := self.run(block)) is not None:
                failures.append(failure)
                break  # later blocks build on this one
        return failures


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    folder = tmp_path_factory.mktemp("docs-session")
    (folder / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    shim = tmp_path_factory.mktemp("docs-shim")
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    hf_home = tmp_path_factory.mktemp("hf-home")
    env = {
        **os.environ,
        **SHORT_ENV,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(p for p in [str(shim), str(REPO), os.environ.get("PYTHONPATH")] if p),
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
    }
    return Session(folder, env)


@pytest.fixture(scope="module")
def readme_failures(session) -> list[str]:
    return session.run_page("README.md")


def test_readme_blocks_run_as_written(readme_failures):
    assert not readme_failures, "\n\n".join(readme_failures)


@pytest.mark.parametrize("page", [p for p in DOC_PAGES if any(b.skip is None for b in runnable(p))])
def test_docs_page_blocks_run_as_written(session, readme_failures, page):
    assert not readme_failures, "README.md's blocks failed first (the docs pages use their outputs)"
    failures = session.run_page(page)
    assert not failures, "\n\n".join(failures)
