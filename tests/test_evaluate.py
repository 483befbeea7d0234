"""eval: perplexity rows and quailora_eval.json on a tiny bundle; progress output (rich, plain, --quiet)."""
import io
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from quailora_cli.main import app
from quailora_cli.progress import HANDLERS, PLAIN, RICH, Reporter
from cli_process import run_cli
from quailora_convert.bundle.layout import EVAL
from quailora_convert.convert import ConvertSettings, convert
from quailora_convert.evaluate import ROW_BASE, ROW_BUNDLE, ROW_INT8, ROW_PLAIN, EvalSettings, evaluate
from quailora_convert.events import EVENT_TYPES, Calibrated, ConversionDone, LayerConverted, Status
from tiny_models import save_tiny, tiny_llama_config, write_text_calibration

TQDM_OR_ANSI = ("\r", "\x1b[", "it/s]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    source = save_tiny(tiny_llama_config(), root / "source")
    calib = write_text_calibration(root / "calib.jsonl")
    heldout = write_text_calibration(root / "heldout.jsonl", count=12, seed=7)
    bundle = convert(ConvertSettings(model=str(source), out=root / "bundle", calib=str(calib), rank=8,
                                     num_samples=16, seq_len=32, rounding="nearest", refine=0))
    return source, calib, heldout, bundle


def test_eval_rows_json_shape_and_adapter_effect(tiny, tmp_path):
    source, _, heldout, bundle = tiny
    result = evaluate(EvalSettings(bundle=bundle, data=str(heldout), num_samples=8, seq_len=32,
                                   json_path=tmp_path / "copy.json"))
    written = json.loads((bundle / EVAL).read_text())
    assert written == json.loads((tmp_path / "copy.json").read_text())
    assert {"rows", "gap_closed", "data"} <= set(written)
    assert all(set(row) == {"model", "perplexity"} for row in written["rows"])
    assert isinstance(written["data"], str) and str(heldout) in written["data"]
    ppl = {row["model"]: row["perplexity"] for row in written["rows"]}
    assert len(ppl) == 4 and ROW_INT8 in ppl and any(name.startswith("source (") for name in ppl)
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl[ROW_PLAIN] != ppl[ROW_BUNDLE]  # disabling the adapter changes the model
    assert written["gap_closed"] is None or math.isfinite(written["gap_closed"])
    assert written["gap_closed"] == result["gap_closed"]
    assert written["details"][0]["tokens"] > 8


def test_eval_of_a_gptq_bundle_compares_against_round_to_nearest(tiny, tmp_path):
    """Plain QLoRA is bnb's round-to-nearest of the source, not the bundle's calibrated base."""
    source, calib, heldout, nearest_bundle = tiny
    gptq_bundle = convert(ConvertSettings(model=str(source), out=tmp_path / "gptq", calib=str(calib), rank=8,
                                          num_samples=16, seq_len=32, rounding="gptq", refine=1))
    settings = dict(data=str(heldout), num_samples=8, seq_len=32)
    nearest = {r["model"]: r["perplexity"] for r in evaluate(EvalSettings(bundle=nearest_bundle, **settings))["rows"]}
    gptq = evaluate(EvalSettings(bundle=gptq_bundle, **settings))
    rows = {r["model"]: r["perplexity"] for r in gptq["rows"]}
    assert [r["model"] for r in gptq["rows"]][2:] == [ROW_PLAIN, ROW_BASE, ROW_BUNDLE]
    assert rows[ROW_PLAIN] == pytest.approx(nearest[ROW_PLAIN], rel=1e-6)  # the same round-to-nearest base
    assert rows[ROW_BASE] != rows[ROW_PLAIN]  # the calibrated codes differ
    assert gptq["gap_closed"] == pytest.approx(
        (rows[ROW_PLAIN] - rows[ROW_BUNDLE]) / (rows[ROW_PLAIN] - rows[ROW_INT8]))


def test_eval_without_source_keeps_the_bundle_rows(tiny, tmp_path):
    _, _, heldout, bundle = tiny
    result = evaluate(EvalSettings(bundle=bundle, data=str(heldout), num_samples=4, seq_len=16,
                                   source=None, skip_source=True, json_path=tmp_path / "r.json"))
    assert [row["model"] for row in result["rows"]] == [ROW_PLAIN, ROW_BUNDLE]
    assert result["gap_closed"] is None


def test_eval_through_cli_runner_prints_table(tiny, tmp_path):
    _, _, heldout, bundle = tiny
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(bundle), "--data", str(heldout), "--num-samples", "4",
                                      "--seq-len", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert ROW_BUNDLE in result.output and "perplexity" in result.output
    assert not any(s in result.output for s in TQDM_OR_ANSI)
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_eval_subprocess_quiet_prints_only_the_json_path(tiny, tmp_path):
    _, _, heldout, bundle = tiny
    result = run_cli("eval", bundle, "--data", heldout, "--num-samples", "4", "--seq-len", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(bundle / EVAL)


def test_eval_refuses_a_folder_that_is_not_a_bundle(tiny):
    source, _, heldout, _ = tiny
    result = run_cli("eval", source, "--data", heldout)
    assert result.returncode == 2 and "not a QuAILoRA bundle" in result.stderr


def test_convert_quiet_prints_only_the_path(tiny, tmp_path):
    source, calib, _, _ = tiny
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "q", "--rank", "4", "--num-samples", "4",
                     "--seq-len", "16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str((tmp_path / "q").resolve())


def test_convert_non_tty_is_line_based_with_eta_summary_and_eval(tiny, tmp_path):
    source, calib, heldout, _ = tiny
    result = run_cli(source, "--calib", calib, "--out", tmp_path / "b", "--rank", "4", "--num-samples", "4",
                     "--seq-len", "16", "--eval", "--eval-data", heldout, "--eval-num-samples", "4",
                     "--eval-seq-len", "16")
    assert result.returncode == 0, result.stderr
    assert not any(s in result.stdout + result.stderr for s in TQDM_OR_ANSI), result.stdout + result.stderr
    assert "layer 2/2 done" in result.stdout and "eta" in result.stdout
    for key in ("mean calibrated-error reduction", "bundle size on disk", "peak memory", ROW_BUNDLE):
        assert key in result.stdout
    assert (tmp_path / "b" / EVAL).exists()


def test_rich_reporter_draws_bars_and_tables(tiny):
    _, _, _, bundle = tiny
    report = json.loads((bundle / "quailora_report.json").read_text())
    buffer = io.StringIO()
    from rich.console import Console

    console = Console(file=buffer, force_terminal=True, width=120)
    with Reporter(RICH, console) as reporter:
        reporter(Calibrated(samples=4, seconds=0.1))
        for i in range(3):
            reporter(LayerConverted(index=i, count=3, seconds=0.1))
        reporter(ConversionDone(out=bundle, report=report))
    text = buffer.getvalue()
    assert "quantize + solve + write layers" in text and "3/3" in text and "conversion summary" in text
    plain = io.StringIO()
    with Reporter(PLAIN, Console(file=plain, width=120)) as reporter:
        reporter(ConversionDone(out=bundle, report=report))
    assert "mean calibrated-error reduction" in plain.getvalue() and "\x1b[" not in plain.getvalue()


def test_reporter_handles_every_event_type_and_refuses_others():
    assert set(HANDLERS) == set(EVENT_TYPES)
    with Reporter(PLAIN) as reporter:
        reporter(Status("known"))
        with pytest.raises(TypeError, match="no handler for str"):
            reporter("an event the library never sends")


# -- issue 22, item 3: eval measures the model the bundle was made from, and never loses a complete result --------
def _eval(bundle, root, *extra, cwd):
    """`quailora-convert eval BUNDLE` as a user in cwd runs it, on the held-out file in root."""
    return run_cli("eval", bundle, "--num-samples", 4, "--seq-len", 16, "--data", root / "held.jsonl", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def relative(tmp_path_factory):
    """A bundle converted from a folder named relatively (`m_base`, as a user types it in its parent folder),
    and another folder elsewhere holding a different model at the same relative name."""
    from quailora_convert.convert.work_folder import fingerprint as work_fingerprint
    from quailora_convert.sources.fingerprint import source_files_fingerprint

    root = tmp_path_factory.mktemp("relative")
    source = save_tiny(tiny_llama_config(), root / "m_base", seed=0)
    write_text_calibration(root / "calib.jsonl")
    write_text_calibration(root / "held.jsonl", count=12, seed=7)
    done = run_cli("m_base", "--calib", "calib.jsonl", "--out", "bundle", "--rank", 8, "--num-samples", 8,
                   "--seq-len", 32, cwd=root)
    assert done.returncode == 0, done.stderr
    elsewhere = root / "elsewhere"
    save_tiny(tiny_llama_config(), elsewhere / "m_base", seed=1)  # another model, same name
    # the eval's fingerprint rule is the work folder's: one folder, one fingerprint
    settings = {"model": str(source), "calib": "calib.jsonl"}
    assert source_files_fingerprint(source) == work_fingerprint(settings, source, None, None, None,
                                                                torch.device("cpu"))["source"]
    return root, source.resolve(), root / "bundle", elsewhere


def _gap(bundle):
    return json.loads((bundle / EVAL).read_text())["gap_closed"]


def test_the_report_records_the_source_resolved_with_its_fingerprint(relative):
    from quailora_convert.sources.fingerprint import source_files_fingerprint

    _, source, bundle, _ = relative
    recorded = json.loads((bundle / "quailora_report.json").read_text())["source"]
    assert recorded["model"] == str(source) and recorded["given"] == "m_base"
    assert recorded["fingerprint"] == source_files_fingerprint(source)


def test_eval_from_another_folder_measures_the_recorded_source(relative):
    root, source, bundle, elsewhere = relative
    here = _eval(bundle, root, "--source", source, cwd=root)  # the source, named explicitly
    assert here.returncode == 0, here.stderr
    expected = _gap(bundle)
    assert expected is not None and math.isfinite(expected)
    there = _eval(bundle, root, cwd=elsewhere)  # ./m_base there is another model
    assert there.returncode == 0, there.stderr
    assert "source rows left out" not in there.stderr
    assert _gap(bundle) == pytest.approx(expected, rel=1e-9)
    other = _eval(bundle, root, "--source", "m_base", "--json", elsewhere / "other.json",
                  cwd=elsewhere)  # explicitly the other model: used as given
    assert other.returncode == 0, other.stderr
    assert json.loads((elsewhere / "other.json").read_text())["gap_closed"] != pytest.approx(expected, rel=1e-3)


def test_a_changed_source_is_left_out_and_a_complete_eval_is_kept(relative, tmp_path):
    root, source, bundle, _ = relative
    complete = _eval(bundle, root, cwd=root)
    assert complete.returncode == 0, complete.stderr
    before = (bundle / EVAL).read_bytes()
    assert any(r["model"] == ROW_INT8 for r in json.loads(before)["rows"])
    moved = root / "m_base.original"
    source.rename(moved)  # the recorded folder now holds another model
    try:
        save_tiny(tiny_llama_config(), source, seed=2)
        refused = _eval(bundle, root, cwd=tmp_path)
        assert refused.returncode == 2
        warning = [line for line in refused.stderr.splitlines() if "source rows left out" in line]
        assert len(warning) == 1 and str(source) in warning[0] and "not the model this bundle was converted from" \
            in warning[0] and "differ from the recorded fingerprint" in warning[0], refused.stderr
        assert f"error: {bundle / EVAL} has rows this eval would not compute" in refused.stderr
        assert (bundle / EVAL).read_bytes() == before
        aside = _eval(bundle, root, "--json", tmp_path / "partial.json", cwd=root)
        assert aside.returncode == 0, aside.stderr
        assert (bundle / EVAL).read_bytes() == before and "kept" in aside.stderr
        assert [r["model"] for r in json.loads((tmp_path / "partial.json").read_text())["rows"]] == \
            [ROW_PLAIN, ROW_BUNDLE]
        replaced = _eval(bundle, root, "--replace-eval", cwd=root)
        assert replaced.returncode == 0, replaced.stderr
        assert [r["model"] for r in json.loads((bundle / EVAL).read_text())["rows"]] == [ROW_PLAIN, ROW_BUNDLE]
    finally:
        import shutil

        shutil.rmtree(source)
        moved.rename(source)
    restored = _eval(bundle, root, cwd=root)  # the recorded source back: its rows return
    assert restored.returncode == 0, restored.stderr
    assert json.loads((bundle / EVAL).read_text())["gap_closed"] is not None
