"""Reading a finished bundle back: is it complete, and what is it (for inspect, the card and push-to-hub)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError
from .layout import (ADAPTER_CONFIG, CARD, CONFIG, EVAL, INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR, INIT_ADAPTER_WEIGHTS,
                     REPORT, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, index_shards, read_config)


def read_json(path: Path, what: str) -> dict:
    """A bundle's JSON file as a dict; BadInputError naming the file when it is missing, not JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BadInputError(f"{path.parent} is not a QuAILoRA bundle: {path.name} is missing") from e
    except json.JSONDecodeError as e:
        raise BadInputError(f"{path} is not valid JSON ({what}; line {e.lineno} col {e.colno}: {e.msg}): the bundle "
                            "is damaged; convert it again") from e
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path} is not UTF-8 text ({what}; byte {e.start}): the bundle is damaged; "
                            "convert it again") from e
    if not isinstance(data, dict):
        raise BadInputError(f"{path} is not a JSON object ({what}): the bundle is damaged; convert it again")
    return data


def read_optional_json(path: Path, what: str) -> dict | None:
    """read_json for a file a bundle may lack (the eval result, ...): None when it is absent."""
    return read_json(path, what) if Path(path).is_file() else None


def refuse_root_adapter(folder: Path) -> None:
    """BadInputError when folder is a bundle of the layout before quailora_init/ (its adapter beside the base).

    transformers attaches such an adapter itself on every load of the folder, and PEFT's loaders then
    attach it a second time: the bundle is refused, never loaded half-right.
    """
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        raise BadInputError(f"{folder} has its adapter at the root ({ADAPTER_CONFIG}), the layout of quailora-convert "
                            f"before {INIT_ADAPTER_DIR}/: convert the model again with this version")


def missing_files(folder: Path) -> list[str]:
    """What a complete bundle lacks: quantized config, listed shards, adapter, report (empty when complete)."""
    folder = Path(folder)
    missing = [name for name in (INIT_ADAPTER_CONFIG, INIT_ADAPTER_WEIGHTS, REPORT) if not (folder / name).is_file()]
    config = folder / CONFIG
    if not config.is_file():
        missing.insert(0, CONFIG)
    elif "quantization_config" not in read_config(folder):  # BadInputError naming it when it is not JSON
        missing.insert(0, f"quantization_config in {CONFIG}")
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = index_shards(index)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
            return missing + [f"a readable {SAFETENSORS_INDEX}"]
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not (folder / SAFETENSORS_SINGLE).is_file():
        missing.append(f"{SAFETENSORS_SINGLE} (or its index)")
    return missing


def verify_bundle(folder: Path) -> Path:
    """The folder, resolved, when it is a complete, readable bundle; otherwise BadInputError naming the file.

    Cheap (JSON files and safetensors headers only): eval, inspect and push-to-hub call it before loading
    any model, so a damaged bundle fails in a second rather than after minutes of work.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    refuse_root_adapter(folder)
    missing = missing_files(folder)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise BadInputError(f"{folder} is not a complete QuAILoRA bundle: missing {shown}")
    read_json(folder / INIT_ADAPTER_CONFIG, "the adapter config")
    read_json(folder / REPORT, "the conversion report")
    index = folder / SAFETENSORS_INDEX
    shards = index_shards(index) if index.is_file() else [SAFETENSORS_SINGLE]
    for name in [INIT_ADAPTER_WEIGHTS, *shards]:
        problem = safetensors_problem(folder / name)
        if problem:
            raise BadInputError(f"{folder / name} is {problem}: the bundle is damaged; convert it again")
    return folder.resolve()


def safetensors_problem(path: Path) -> str | None:
    """Why path is not a whole safetensors file (truncated, not safetensors), from its header alone; None if fine."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return f"not a safetensors file or truncated ({size} bytes)"
        try:
            header = json.loads(f.read(length))
            end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # JSONDecodeError, UnicodeDecodeError
            return "not a safetensors file (its header is not readable)"
    if 8 + length + end > size:
        return f"truncated ({size} bytes of the {8 + length + end} its header describes)"
    return None


def describe_bundle(folder: Path) -> dict:
    """A summary of a bundle from its report, adapter config and optional eval (no tensors are read)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder")
    refuse_root_adapter(folder)
    report = read_json(folder / REPORT, "the conversion report")
    if "summary" not in report or "settings" not in report:
        raise BadInputError(f"{folder / REPORT} is not a quailora-convert report (no summary/settings)")
    settings, summary = report["settings"], report["summary"]
    adapter = read_optional_json(folder / INIT_ADAPTER_CONFIG, "the adapter config") or {}
    evaluation = read_optional_json(folder / EVAL, "the eval result")
    relative = summary.get("relative_error_after")
    source = report.get("source", {})
    missing = missing_files(folder)
    return {
        "bundle": str(folder.resolve()),
        "source": {"model": source.get("model"), "repo_id": source.get("repo_id"), "commit": source.get("commit")},
        "quantization": report.get("quantization", {}),
        "lora": {"rank": settings.get("rank"), "alpha": settings.get("lora_alpha"),
                 "use_rslora": settings.get("use_rslora"), "target_modules": adapter.get("target_modules"),
                 "base_model_name_or_path": adapter.get("base_model_name_or_path"), "folder": INIT_ADAPTER_DIR},
        "solver": {"name": settings.get("solver"),
                   "als_steps": settings.get("als_steps") if settings.get("solver") == "als" else None,
                   "damp": settings.get("damp")},
        "base": {"rounding": settings.get("rounding", "nearest"), "refine": settings.get("refine", 0),
                 "scales": settings.get("scales", "absmax"),
                 "gptq_damp": settings.get("gptq_damp") if settings.get("rounding") == "gptq" else None},
        "calibration": {"data": settings.get("calib"), "samples": report.get("calibration", {}).get("samples"),
                        "tokens": report.get("calibration", {}).get("tokens"), "seq_len": settings.get("seq_len"),
                        "seed": settings.get("seed")},
        "error": {"modules": summary.get("modules"), "relative_error_after": relative,
                  "reduction": None if relative is None else 1.0 - relative},
        "versions": {"quailora_convert": report.get("quailora_convert"), **report.get("versions", {})},
        "timings": {"total_seconds": report.get("timings", {}).get("total_seconds")},
        "eval": evaluation,
        "complete": not missing,
        "missing": missing,
        "card": (folder / CARD).is_file(),
    }
