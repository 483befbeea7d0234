"""Every code block of README.md and of the model card template, extracted from the file and run as a user runs it.

The blocks are parsed out of the files at collection time (one test per fenced block), never copied here. They run
in a temporary folder laid out as the docs assume, on tiny stand-ins:

- smollm2-quailora: a tiny bundle (tests/bundles.py make_bundle, written there); my-adapter: its adapter with
  perturbed factors, saved by PEFT as a fine-tune leaves it; train.jsonl: a few "text" records for the TRL example.
- Python blocks of one file run in order in one namespace, as in a notebook session (the TRL block trains the
  `model` the loading block made). The model card's blocks come from the template rendered for the tiny bundle.
- Shell blocks run with bash, the console script on PATH, after the substitutions in SUBSTITUTIONS (the real
  SmolLM2 and the workplace's calibration files become tiny ones). push-to-hub goes to tests/fake_hub.py's fake Hub
  over a real socket (HF_ENDPOINT). torchrun lines need several GPUs and a Hub download: their quailora-convert
  command runs alone with --dry-run, on the tiny model, so every option they show is still parsed and planned.
- Skipped, each with its reason: the Quick start block (.ci/run runs it verbatim), the test-suite command (this
  test is part of the suite).
A block this file has no rule for fails: a new snippet needs a rule here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import torch

from bundles import make_bundle
from fake_hub import TOKEN, FakeHub
from paths import REPO
from quailora_convert.bundle.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG, EVAL, INIT_ADAPTER_DIR
from tiny_models import write_text_calibration

README = REPO / "README.md"
CARD_TEMPLATE = REPO / "model_cards" / "quailora_bundle.md"
README_LIMIT = 15_000
BUNDLE, ADAPTER = "smollm2-quailora", "my-adapter"  # the names the docs use
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.MULTILINE)

# What the real-model commands become here: (text in the docs, its tiny stand-in under the workspace).
SUBSTITUTIONS = [
    ("$(python ../shared/scripts/smollm2.py | tail -n 1)", "tiny-source"),  # the real SmolLM2-135M: minutes
    ("../shared/data/calib/self_instruct_alpaca.jsonl", "calib.jsonl"),  # the workplace's calibration file
    ("../shared/data/calib/code_alpaca_2k.json", "heldout.jsonl"),  # the workplace's held-out text
    ("meta-llama/Llama-2-70b-hf", "tiny-source"),  # a Hub download of 140 GB
    ("--calib alpaca", "--calib calib.jsonl"),  # a Hub dataset
]
# SFTConfig on a CPU: TRL's bf16 default needs a GPU, so the blocks say "on a CPU, also use_cpu=True"; done here.
PYTHON_SUBSTITUTIONS = [] if torch.cuda.is_available() else [("SFTConfig(", "SFTConfig(use_cpu=True, ")]
SKIPPED = {
    "quick start": "bash .ci/run reads the Quick start block from README.md and runs it verbatim",
    "python -m pytest": "the test suite itself: this test is part of it",
}


@dataclass(frozen=True)
class Snippet:
    document: str  # "README.md" or the card template's name
    number: int  # position among the document's fenced blocks
    section: str  # the heading above the block
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.document}#{self.number}-{self.language}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}"


def fenced_blocks(text: str, document: str) -> list[Snippet]:
    headings = [(m.start(), m.group(2).strip()) for m in HEADING.finditer(text)]
    blocks = []
    for number, match in enumerate(FENCE.finditer(text)):
        above = [title for start, title in headings if start < match.start()]
        blocks.append(Snippet(document, number, above[-1] if above else "", match.group(1), match.group(2)))
    return blocks


README_BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"), README.name)
CARD_BLOCKS = fenced_blocks(CARD_TEMPLATE.read_text(encoding="utf-8"), CARD_TEMPLATE.name)


def skip_reason(snippet: Snippet) -> str | None:
    if snippet.document == README.name and snippet.section.lower() == "quick start":
        return SKIPPED["quick start"]
    commands = shell_commands(snippet.code) if snippet.language == "bash" else []
    if commands and all(c.startswith("python -m pytest") for c in commands):
        return SKIPPED["python -m pytest"]
    return None


# -- the workspace ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The folder the docs' commands run in: tiny source, bundle, calibration, held-out text, TRL data, adapter."""
    root = tmp_path_factory.mktemp("docs")
    work = root / "work"
    work.mkdir()
    source, _ = make_bundle(root, out=work / BUNDLE)
    shutil.copytree(source, work / "tiny-source")
    write_text_calibration(work / "calib.jsonl", count=160)
    write_text_calibration(work / "heldout.jsonl", count=40, seed=1)
    write_text_calibration(work / "train.jsonl", count=16, seed=2)  # records with a "text" field
    save_fine_tuned_adapter(work / BUNDLE, work / ADAPTER)
    return work


def save_fine_tuned_adapter(bundle: Path, out: Path) -> None:
    """The bundle's adapter with every factor moved a little, saved by PEFT: what a fine-tune leaves behind."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, bundle, subfolder=INIT_ADAPTER_DIR, is_trainable=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)


@pytest.fixture
def workspace(pristine, tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(pristine, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


# -- Python: one session per document ----------------------------------------------------------------------------

class Session:
    """The namespace a document's Python blocks share, run in order in one folder; each block runs once."""

    def __init__(self, folder: Path, blocks: list[Snippet]):
        self.folder, self.blocks = folder, [b for b in blocks if b.language == "python"]
        self.namespace: dict = {"__name__": "__main__"}
        self.done: dict[int, BaseException | None] = {}

    def run_through(self, snippet: Snippet) -> None:
        for block in self.blocks:
            if block.number not in self.done:
                self.done[block.number] = self._run(block)
            failure = self.done[block.number]
            if block.number == snippet.number:
                if failure is not None:
                    raise failure
                return
            if failure is not None:
                pytest.fail(f"the earlier block {block.id} failed: {failure!r}")

    def _run(self, block: Snippet) -> BaseException | None:
        code = block.code
        for text, replacement in PYTHON_SUBSTITUTIONS:
            code = code.replace(text, replacement)
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            exec(compile(code, block.id, "exec"), self.namespace)  # noqa: S102 - the documented snippet
        except BaseException as e:  # noqa: BLE001 - reported by this block's test
            return e
        finally:
            os.chdir(cwd)
        return None


@pytest.fixture(scope="module")
def readme_session(pristine, tmp_path_factory) -> Session:
    return Session(_copy(pristine, tmp_path_factory.mktemp("readme-session")), README_BLOCKS)


@pytest.fixture(scope="module")
def card_session(pristine, tmp_path_factory) -> Session:
    folder = _copy(pristine, tmp_path_factory.mktemp("card-session"))
    return Session(folder, rendered_card_blocks(folder / BUNDLE))


def rendered_card_blocks(bundle: Path, revision: str | None = None) -> list[Snippet]:
    """The template's blocks as the card a bundle ships shows them (model_id: the folder name the docs use)."""
    from quailora_convert.model_card import render_model_card

    card = str(render_model_card(bundle, model_id=BUNDLE, revision=revision, write=False))
    blocks = fenced_blocks(card, CARD_TEMPLATE.name)
    assert [(b.language, b.section) for b in blocks] == [(b.language, b.section) for b in CARD_BLOCKS]
    return blocks


def _copy(pristine: Path, root: Path) -> Path:
    """A session's own folder: the workspace without my-adapter, which its blocks write."""
    folder = root / "work"
    shutil.copytree(pristine, folder, symlinks=True, ignore=lambda where, names: [ADAPTER] if Path(where) == pristine else [])
    return folder


def check_python_effects(snippet: Snippet, session: Session) -> None:
    """What the block promises, checked on the namespace and the folder it left."""
    namespace, code = session.namespace, snippet.code
    if "from_pretrained(" in code and "is_trainable=True" in code:  # a loading recipe
        model = namespace["model"]
        assert list(model.peft_config) == ["default"]  # one adapter: ours, not a second one
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    if f'save_pretrained("{ADAPTER}")' in code:  # the fine-tuned adapter, different from the init
        from safetensors.torch import load_file

        saved = load_file(session.folder / ADAPTER / ADAPTER_WEIGHTS)
        init = load_file(session.folder / BUNDLE / INIT_ADAPTER_DIR / ADAPTER_WEIGHTS)
        assert saved.keys() == init.keys() and saved
        assert any(not torch.equal(saved[k].float(), init[k].float()) for k in saved)  # training moved them
        assert json.loads((session.folder / ADAPTER / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("snippet", [b for b in README_BLOCKS if b.language == "python"], ids=lambda b: b.id)
def test_readme_python_block_runs(snippet, readme_session):
    readme_session.run_through(snippet)
    check_python_effects(snippet, readme_session)


@pytest.mark.parametrize("snippet", [b for b in CARD_BLOCKS if b.language == "python"], ids=lambda b: b.id)
def test_card_python_block_runs(snippet, card_session):
    rendered = next(b for b in card_session.blocks if b.number == snippet.number)
    card_session.run_through(rendered)
    check_python_effects(rendered, card_session)


def test_card_python_blocks_with_a_hub_revision_compile(pristine):
    """Rendered for a Hub branch the blocks gain revision=...: still Python, and the revision reaches every load."""
    blocks = [b for b in rendered_card_blocks(pristine / BUNDLE, revision="dev") if b.language == "python"]
    assert blocks
    for block in blocks:
        compile(block.code, block.id, "exec")
    assert blocks[0].code.count('revision="dev"') == 3  # base, adapter, tokenizer


# -- shell ---------------------------------------------------------------------------------------------------------

def shell_commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def runnable_command(command: str) -> str:
    for text, replacement in SUBSTITUTIONS:
        command = command.replace(text, replacement)
    if command.startswith("torchrun "):  # several GPUs: the converter's own command, planned only
        words = shlex.split(command)
        command = shlex.join(words[words.index("--no-python") + 1:] + ["--dry-run"])
    return command


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def shell_environment(folder: Path, hub_endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("QUAILORA_DEBUG", None)
    if hub_endpoint:
        env.update(HF_ENDPOINT=hub_endpoint, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0",
                   HF_TOKEN_PATH=str(folder / "no-saved-token"))
    return env


def run_shell(snippet: Snippet, folder: Path) -> tuple[subprocess.CompletedProcess, FakeHub | None]:
    commands = [runnable_command(c) for c in shell_commands(snippet.code)]
    for command in commands:  # what the block writes must not exist yet (the workspace holds a bundle)
        for out in re.findall(r"--out (\S+)", command):
            if (folder / out).exists():
                shutil.rmtree(folder / out)
    hub = server = None
    if any("push-to-hub" in c for c in commands):
        hub = FakeHub()
        server = make_server("127.0.0.1", 0, hub, handler_class=_QuietHandler)
        hub.endpoint = f"http://127.0.0.1:{server.server_port}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
    script = "set -euo pipefail\n" + "\n".join(f"echo '+ '{shlex.quote(c)}\n{c}" for c in commands)
    try:
        result = subprocess.run(["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=600,
                                env=shell_environment(folder, hub.endpoint if hub else None))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    return result, hub


def check_shell_effects(snippet: Snippet, folder: Path, hub: FakeHub | None) -> None:
    from transformers import AutoModelForCausalLM

    for command in (runnable_command(c) for c in shell_commands(snippet.code)):
        words = shlex.split(command)
        if "--dry-run" in words:
            continue
        if words[0] == "quailora-convert" and "--out" in words:  # a conversion: a complete bundle
            out = folder / words[words.index("--out") + 1]
            assert (out / CONFIG).is_file() and (out / INIT_ADAPTER_DIR / ADAPTER_CONFIG).is_file()
        if "push-to-hub" in words:
            repo = words[words.index("push-to-hub") + 2]
            assert hub is not None and hub.commits and hub.commits[-1].repo_id == repo
            assert f"{INIT_ADAPTER_DIR}/{ADAPTER_CONFIG}" in hub.commits[-1].files
        if "--merged" in words:  # a plain transformers checkpoint
            merged = AutoModelForCausalLM.from_pretrained(folder / words[words.index("--merged") + 1])
            assert not hasattr(merged, "peft_config") and not getattr(merged.config, "quantization_config", None)
        if "--lora-for-source" in words:  # a plain LoRA that PEFT puts on the source its config names
            from peft import PeftModel

            lora = folder / words[words.index("--lora-for-source") + 1]
            source = json.loads((lora / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), lora)
            assert list(model.peft_config) == ["default"] and model.peft_config["default"].peft_type == "LORA"
        if words[:2] == ["quailora-convert", "eval"]:  # the perplexity table, kept in the bundle
            assert (folder / words[2] / EVAL).is_file()


SHELL_BLOCKS = [b for b in README_BLOCKS + CARD_BLOCKS if b.language == "bash"]


@pytest.mark.parametrize("snippet", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block_runs(snippet, workspace, pristine):
    reason = skip_reason(snippet)
    if reason:
        pytest.skip(reason)
    if snippet.document == CARD_TEMPLATE.name:  # as the card shows it, for the tiny bundle
        snippet = next(b for b in rendered_card_blocks(pristine / BUNDLE) if b.number == snippet.number)
    result, hub = run_shell(snippet, workspace)
    assert result.returncode == 0, f"{snippet.id} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    check_shell_effects(snippet, workspace, hub)


# -- the documents themselves --------------------------------------------------------------------------------------

def test_every_block_has_a_rule():
    for snippet in README_BLOCKS + CARD_BLOCKS:
        assert snippet.language in ("python", "bash"), f"{snippet.id}: no rule runs a ```{snippet.language} block"


def test_readme_is_short_and_links_the_docs_it_moved_out():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters (limit {README_LIMIT})"
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (REPO / link).is_file(), link
    assert "docs/benchmarks.md" in text and "docs/design.md" in text
    benchmarks = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for image in re.findall(r"\]\(([^)#:]+\.png)\)", benchmarks):
        assert (REPO / "docs" / image).is_file(), image


def test_the_card_says_first_what_a_plain_load_gives(pristine):
    from quailora_convert.model_card import render_model_card

    card = str(render_model_card(pristine / BUNDLE, model_id=BUNDLE, write=False))
    first = card.split("\n# ", 1)[1].split("\n\n")[1]  # the paragraph under the title
    assert f'AutoModelForCausalLM.from_pretrained("{BUNDLE}")' in first and "quantized base alone" in first
    assert f"`{INIT_ADAPTER_DIR}/`" in first
