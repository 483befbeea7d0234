"""`quailora-convert push-to-hub DIR REPO_ID`: publish a bundle so that one line loads it from the Hub."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from quailora_cli.app import app


@app.command("push-to-hub")
def push_to_hub(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder written by quailora-convert.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo, namespace/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (ignored if it exists).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created if missing).")] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Commit message.")] = None,
) -> None:
    """Upload a complete bundle to REPO_ID: the base at the root, the adapter in quailora_init/ naming REPO_ID as its base."""
    from quailora_convert.publish import push_to_hub as run_push

    result = run_push(bundle, repo_id, private=private, revision=revision, commit_message=commit_message)
    typer.echo(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}")
    from quailora_convert.bundle.layout import INIT_ADAPTER_DIR

    snippet = f'"{result.repo_id}"' + (f', revision="{result.revision}"' if result.revision != "main" else "")
    typer.echo(f"load it with: PeftModel.from_pretrained(prepare_model_for_kbit_training(AutoModelForCausalLM"
               f".from_pretrained({snippet})), {snippet}, subfolder=\"{INIT_ADAPTER_DIR}\", is_trainable=True)")
