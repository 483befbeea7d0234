"""quiet_libraries: library messages nobody can act on are filtered where they arise, shown with --verbose;
bitsandbytes' missing CPU kernel becomes at most one line that says what it costs and how to get the kernel."""
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import typer
from typer.testing import CliRunner

from bundles import make_bundle
from cli_process import run_cli
from quailora_cli.evaluate import VerboseOption
from quailora_cli.main import app
from quailora_convert import quiet_libraries as quiet
from quailora_convert.quiet_libraries import BNB_KERNEL_MESSAGE, NOTE_CPU_KERNEL, quiet_libraries
from tiny_models import tiny_llama_config, write_text_calibration

GRADIENT_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated"
NOTE_START = NOTE_CPU_KERNEL.split("(")[0]


def peft_wrap_warnings() -> list[str]:
    """The warnings PEFT's wrapping of a transformers model raises (it reads model.is_gradient_checkpointing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    with warnings.catch_warnings(record=True) as caught:  # the filters in force decide what is recorded
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return [str(w.message) for w in caught]


def test_transformers_future_warning_is_filtered_and_shown_with_verbose():
    assert any(GRADIENT_CHECKPOINTING in m for m in peft_wrap_warnings())  # the libraries raise it
    filters = list(warnings.filters)  # after the libraries' imports, which add their own
    with quiet_libraries():
        assert not any(GRADIENT_CHECKPOINTING in m for m in peft_wrap_warnings())
    with quiet_libraries(verbose=True), quiet_libraries():  # library code inherits the CLI's --verbose
        assert any(GRADIENT_CHECKPOINTING in m for m in peft_wrap_warnings())
    assert warnings.filters == filters  # left as found


def test_bnb_int8_cast_message_is_dropped_only_within(caplog):
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        with quiet_libraries():
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "bf16")
        assert caplog.messages == []
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "bf16")
    assert len(caplog.messages) == 1 and not logger.filters


BNB_PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")  # as the CLI does
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as the CLI's progress display does
    from quailora_convert.quiet_libraries import missing_cpu_kernel, quiet_libraries
    verbose = sys.argv[1] == "verbose"
    with quiet_libraries(verbose):  # a conversion: bitsandbytes imported, no 4-bit layer run on the CPU
        import bitsandbytes
    print("missing" if missing_cpu_kernel() else "present", flush=True)
    print("--- eval", file=sys.stderr, flush=True)
    with quiet_libraries(verbose), quiet_libraries(runs_4bit_on_cpu=True), quiet_libraries(runs_4bit_on_cpu=True):
        pass
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_bnb_missing_kernel_is_one_line_where_it_costs_something(verbose):
    """A fresh interpreter: bitsandbytes logs its message at import, on CPUs with AVX512-BF16 only."""
    result = subprocess.run([sys.executable, "-c", BNB_PROBE, "verbose" if verbose else "quiet"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    missing = result.stdout.strip() == "missing"
    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA the CPU kernel is not what runs the model: the note is never said")
    converting, evaluating = result.stderr.split("--- eval\n")
    raw = [line for line in result.stderr.splitlines() if BNB_KERNEL_MESSAGE in line]
    if verbose:  # bitsandbytes' own line, once, even with its logger tree silenced; no note of ours
        assert len(raw) == (1 if missing else 0) and (BNB_KERNEL_MESSAGE in converting) is missing
        assert NOTE_START not in result.stderr
    else:  # nothing while converting; one line before 4-bit layers run on the CPU
        assert converting == "" and raw == []
        assert len(evaluating.splitlines()) == (1 if missing else 0)
        if missing:
            assert evaluating.startswith("WARNING: " + NOTE_START) and "pip install kernels" in evaluating


def test_verbose_option_runs_the_command_within_quiet_libraries():
    """What `verbose: VerboseOption = False` gives a command (eval, demo; convert by the same line)."""
    seen = []
    probe = typer.Typer()

    @probe.command()
    def command(verbose: VerboseOption = False) -> None:
        with warnings.catch_warnings(record=True) as caught:  # keeps the filters in force
            warnings.warn(f"{GRADIENT_CHECKPOINTING} and will be removed in v6.", FutureWarning)
        seen.append((verbose, quiet._verbose.get(), len(caught)))

    filters = list(warnings.filters)
    for args in ([], ["--verbose"]):
        result = CliRunner().invoke(probe, args)
        assert result.exit_code == 0, result.output
        assert warnings.filters == filters and quiet._verbose.get() is False  # the command's context left
    assert seen == [(False, False, 0), (True, True, 1)]
    for command in ("eval", "demo"):
        assert "--verbose" in CliRunner().invoke(app, [command, "--help"]).output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    return make_bundle(root)[1], write_text_calibration(root / "heldout.jsonl", count=8, seed=7)


def test_eval_prints_no_library_warning_nobody_can_act_on(bundle):
    folder, heldout = bundle
    result = run_cli("eval", folder, "--data", heldout, "--num-samples", "2", "--seq-len", "16")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for filtered in (GRADIENT_CHECKPOINTING, BNB_KERNEL_MESSAGE, "MatMul8bitLt"):
        assert not any(filtered in line for line in lines), result.stderr
    assert len([line for line in lines if "bitsandbytes" in line]) <= 1
    assert all(line.startswith("WARNING: " + NOTE_START) for line in lines if "bitsandbytes" in line)
