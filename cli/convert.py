"""`quailora-convert [convert] MODEL ...`: the conversion command. Defaults come from ConvertSettings."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app, defaults_of
from quailora_cli.evaluate import EVAL_DEFAULT, VerboseOption, run_eval
from quailora_cli.progress import Reporter, choose_mode
from quailora_convert.convert.settings import ConvertSettings
from quailora_convert.errors import is_other_rank
from quailora_convert.eval_settings import EvalSettings

DEFAULT = defaults_of(ConvertSettings)
SETTINGS = {f.name for f in fields(ConvertSettings)}


@app.command()
def convert(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=(
        "Local folder of safetensors shards, a Hub model id, or a .gguf file (dequantized by transformers and "
        "materialised in full in a temporary folder: not streamed, needs the model's float32 size in memory)."))],
    calib: Annotated[str, typer.Option("--calib", help=(
        "Calibration data: a preset (alpaca, chip2, self-instruct, hh-rlhf, slimorca: the paper's sets, from the "
        "Hub), a Hub dataset id org/name, or a local Alpaca .json/.jsonl, text .jsonl or .txt; 'self': data-free, "
        "text the model samples itself from built-in prompts (loads the whole model; refused above 15B parameters)."))],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the bundle to.")],
    bits: Annotated[int, typer.Option("--bits", help="4 = NF4 (double quant, block 64), 8 = LLM.int8.")] = DEFAULT["bits"],
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = DEFAULT["rank"],
    lora_alpha: Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha.")] = DEFAULT["lora_alpha"],
    use_rslora: Annotated[bool, typer.Option("--use-rslora", help="Scale by alpha/sqrt(r) (rsLoRA).")] = DEFAULT["use_rslora"],
    lora_split: Annotated[str, typer.Option("--lora-split", help=(
        "How M is split into lora_B @ lora_A (M unchanged): balanced (U sqrt(S), sqrt(S) V^T), a-kaiming "
        "(lora_A's rows the norm of PEFT's default init, lora_B the rest), u (lora_A = V^T)."))] = DEFAULT["lora_split"],
    solver: Annotated[str, typer.Option("--solver", help=(
        "exact (closed form), als (paper), svd (weight-space)."))] = DEFAULT["solver"],
    als_steps: Annotated[int, typer.Option("--als-steps", help="Alternating steps for --solver als.")] = DEFAULT["als_steps"],
    rounding: Annotated[str, typer.Option("--rounding", help=(
        "Base codes: nearest (bitsandbytes' own), or gptq (bnb's scales, codes chosen with error feedback "
        "through the calibration H; the file stays plain bitsandbytes)."))] = DEFAULT["rounding"],
    scales: Annotated[str, typer.Option("--scales", help=(
        "NF4 block scales: absmax (bitsandbytes' own), or calibrated (each block of 64 may clip its outliers: "
        "the scale is searched under the calibration H, never a larger base error; the file stays plain "
        "bitsandbytes). --bits 4 only."))] = DEFAULT["scales"],
    refine: Annotated[int, typer.Option("--refine", help=(
        "Rounds of re-rounding W - M and re-solving M; the best iterate is kept."))] = DEFAULT["refine"],
    gptq_damp: Annotated[float, typer.Option("--gptq-damp", help=(
        "Added to H's diagonal for --rounding gptq, relative to its mean."))] = DEFAULT["gptq_damp"],
    report_baseline: Annotated[bool, typer.Option("--report-baseline", help=(
        "Also report, per module and in the card, the error of the weight-space init (rank-r SVD of E, "
        "LoftQ-like) for comparison: one more SVD per module."))] = DEFAULT["report_baseline"],
    target_modules: Annotated[str, typer.Option("--target-modules", help=(
        "all-linear, or comma-separated names."))] = DEFAULT["target_modules"],
    num_samples: Annotated[int, typer.Option("--num-samples", help=(
        "Calibration samples. The paper used 2000: ~16x the capture time and CPU activation memory "
        "(samples x seq-len x hidden x 4 bytes) of the default 128; the solve time does not change."))] = DEFAULT["num_samples"],
    seq_len: Annotated[int, typer.Option("--seq-len", help=(
        "Max tokens per calibration sample (cost grows linearly)."))] = DEFAULT["seq_len"],
    calib_split: Annotated[Optional[str], typer.Option("--calib-split", show_default="train",
                                                       help="Split of a Hub dataset or preset.")] = DEFAULT["calib_split"],
    calib_field: Annotated[Optional[str], typer.Option("--calib-field", help=(
        "Text column of a Hub dataset; default: Alpaca columns, else 'text'."))] = DEFAULT["calib_field"],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration samples per forward.")] = DEFAULT["batch_size"],
    calib_dtype: Annotated[str, typer.Option("--calib-dtype", help=(
        "dtype of the calibration forward (H is summed in float32): auto (a bfloat16 checkpoint in bfloat16 on CUDA "
        "GPUs and on CPUs with AMX, else float32), float32, bfloat16, float16 (these two: for weights stored in "
        "them)."))] = DEFAULT["calib_dtype"],
    hessian_dtype: Annotated[str, typer.Option("--hessian-dtype", help=(
        "Inputs of the H update (sums stay float32): float32, or bfloat16 (X rounded to bfloat16, products "
        "accumulated in float32; faster on GPUs)."))] = DEFAULT["hessian_dtype"],
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda:0, ...")] = DEFAULT["device"],
    seed: Annotated[int, typer.Option("--seed", help="Seed of calibration sampling.")] = DEFAULT["seed"],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")] = DEFAULT["revision"],
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace an existing --out, and discard an interrupted run's state (OUT.quailora-work)."))] = DEFAULT["overwrite"],
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue an interrupted run (killed, out of memory, SIGTERM) from its last resume point; the result is "
        "byte-identical to an uninterrupted run. Refused if the source, settings or versions differ."))] = DEFAULT["resume"],
    resume_interval: Annotated[float, typer.Option("--resume-interval", metavar="SECONDS", help=(
        "Seconds between resume points (each writes the next layer's inputs to disk); a crash or stop loses at "
        "most about this much work. 0: after every layer."))] = DEFAULT["resume_interval"],
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=(
        "Accept pickle-only (.bin) weights; unpickling can run code."))] = DEFAULT["allow_pickle"],
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=(
        "Run the model's own modeling code (auto_map)."))] = DEFAULT["trust_remote_code"],
    max_shard_bytes: Annotated[int, typer.Option("--max-shard-bytes", help=(
        "Start a new base shard once one holds this many bytes."))] = DEFAULT["max_shard_bytes"],
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Print the plan and write nothing: layers, modules, calibration tokens, estimated peak host and device "
        "memory, bundle and disk bytes, and seconds (from timing one random-weight layer on the device)."))] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: the plan as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the bundle's path.")] = False,
    verbose: VerboseOption = False,
    with_eval: Annotated[bool, typer.Option("--eval", help="Then run `eval` on the bundle (see eval --help).")] = False,
    eval_data: Annotated[Optional[str], typer.Option(
        "--eval-data", help="--data of --eval (default: self).")] = EVAL_DEFAULT["data"],
    eval_num_samples: Annotated[int, typer.Option("--eval-num-samples", help=(
        "--num-samples of --eval."))] = EVAL_DEFAULT["num_samples"],
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="--seq-len of --eval.")] = EVAL_DEFAULT["seq_len"],
) -> None:
    """Convert MODEL into a QLoRA bundle at --out."""
    options = {name: value for name, value in ctx.params.items() if name in SETTINGS}
    options["target_modules"] = _target_modules(target_modules)
    settings = ConvertSettings(**options)
    if dry_run or as_json:
        if not dry_run:
            raise typer.BadParameter("--json goes with --dry-run")
        print_plan(settings, as_json, choose_mode(quiet or as_json))
        return
    evaluation = dict(data=eval_data, num_samples=eval_num_samples, seq_len=eval_seq_len) if with_eval else None
    if is_other_rank():  # torchrun: rank 0 reports and evaluates; the others share the conversion silently
        convert_then_eval(settings, choose_mode(True), None)
        return
    path = convert_then_eval(settings, choose_mode(quiet), evaluation)
    typer.echo(str(path) if quiet else f"bundle written to {path}")


def convert_then_eval(settings: ConvertSettings, mode: str, evaluation: dict | None = None) -> Path:
    """Convert; then, given evaluation (EvalSettings' fields but the bundle), evaluate the new bundle.

    The source is opened once for both, so a .gguf file is dequantized once.
    """
    from quailora_convert.convert.allocator import serve_large_blocks_from_mmap
    from quailora_convert.convert.pipeline import convert, open_source
    from quailora_convert.stopping import stop_on_signals

    settings.validate()  # before the source is opened (a GGUF file dequantized)
    serve_large_blocks_from_mmap()  # peak RSS must not grow with the number of layers
    with ExitStack() as sources:
        sources.enter_context(stop_on_signals())  # SIGTERM / Ctrl-C: stop at a resume point
        with Reporter(mode) as reporter:
            opened = sources.enter_context(open_source(settings, reporter)) if evaluation is not None else None
            path = convert(settings, on_event=reporter, opened=opened)
        if evaluation is not None:  # the bundle is complete; eval adds quailora_eval.json and re-renders the card
            with Reporter(mode) as reporter:
                run_eval(EvalSettings(bundle=path, **evaluation), reporter, opened=opened)
    return path


def print_plan(settings: ConvertSettings, as_json: bool, mode: str) -> None:
    import json

    from quailora_convert.convert.pipeline import dry_run

    with Reporter(mode) as reporter:
        plan = dry_run(settings, on_event=reporter)
    if as_json:
        typer.echo(json.dumps(plan.as_json(), indent=2))
        return
    gib = 1 << 30
    typer.echo(f"plan for {settings.model} -> {settings.out} (nothing written)\n"
               f"  layers {plan.layers}, targeted modules {plan.targeted_modules}, parameters {plan.parameters:,}\n"
               f"  calibration: {plan.calibration_samples} samples, {plan.calibration_tokens:,} tokens\n"
               f"  peak host memory ~{plan.peak_host_bytes / gib:.2f} GiB, peak device memory "
               f"~{plan.peak_device_bytes / gib:.2f} GiB{' (the device is the host)' if not plan.peak_device_bytes else ''}"
               f"; calibration activations kept on the {plan.activations_on}\n"
               f"  bundle ~{plan.bundle_bytes / gib:.3f} GiB, disk during the run ~{plan.disk_bytes / gib:.3f} GiB "
               f"(bundle + work folder)\n"
               f"  time ~{plan.seconds / 60:.1f} min ({plan.seconds:.0f} s)")


def _target_modules(option: str) -> str | list[str]:
    if option == "all-linear":
        return option
    return [name.strip() for name in option.split(",") if name.strip()]
