"""push-to-hub against a fake Hub served at the HTTP level (huggingface_hub's own client and code paths)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from bundles import make_bundle
from fake_hub import TOKEN, FakeHub
from quailora_cli.main import app, main  # importing main registers every command
from quailora_convert.bundle.layout import ADAPTER_CONFIG, INIT_ADAPTER_CONFIG, INIT_ADAPTER_DIR, INIT_ADAPTER_WEIGHTS
from quailora_convert.errors import BadInputError
from quailora_convert.model_card import card_problems
from quailora_convert.publish import HubPublishError, push_to_hub

REPO = "alice/tiny-quailora"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("publish"))[1]


def bundle_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_bundle_with_an_adapter_config_that_points_at_the_repo(bundle, hub):
    before = bundle_files(bundle)
    result = push_to_hub(bundle, REPO, private=True, commit_message="first upload")

    assert hub.repos[REPO]["private"] is True and hub.repos[REPO]["visibility"] == "private"
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO, "main", "first upload")
    assert set(commit.files) == set(before) == set(result.files)
    assert any(name.startswith("model-00001-of-") for name in commit.files)  # the index and all its shards
    assert INIT_ADAPTER_WEIGHTS in commit.files and ADAPTER_CONFIG not in commit.files  # the base at the root only
    uploaded = json.loads(commit.files[INIT_ADAPTER_CONFIG])
    local = json.loads(before[INIT_ADAPTER_CONFIG])
    assert uploaded["base_model_name_or_path"] == REPO and uploaded["revision"] is None
    assert {k: v for k, v in uploaded.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in local.items() if k != "base_model_name_or_path"}
    for name, data in before.items():
        if name not in (INIT_ADAPTER_CONFIG, "README.md"):
            assert commit.files[name] == data, name
    card = commit.files["README.md"].decode()
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", dtype=torch.float32)' in card and card_problems(card) == []
    assert f'"{REPO}", subfolder="{INIT_ADAPTER_DIR}"' in card
    assert hub.validated_cards == [card]  # the Hub-side YAML check saw exactly the uploaded card
    assert bundle_files(bundle) == before  # the local bundle is untouched
    assert result.commit_url.endswith(result.commit_oid)
    assert {path for _, path in hub.requests} - {"/api/agent-harnesses"} == {  # the latter: the library's telemetry
        "/api/repos/create", "/api/validate-yaml", f"/api/models/{REPO}/preupload/main", f"/api/models/{REPO}/commit/main"}


def test_push_to_a_branch_creates_it_and_pins_the_adapter_revision(bundle, hub):
    push_to_hub(bundle, REPO)
    push_to_hub(bundle, REPO, revision="dev", commit_message="to dev")  # the repo exists now: exist_ok
    assert hub.repos[REPO]["private"] is False and ("POST", f"/api/models/{REPO}/branch/dev") in hub.requests
    commit = hub.commits[-1]
    assert (commit.revision, commit.summary) == ("dev", "to dev")
    adapter = json.loads(commit.files[INIT_ADAPTER_CONFIG])
    assert adapter["base_model_name_or_path"] == REPO and adapter["revision"] == "dev"
    assert f'from_pretrained("{REPO}", revision="dev", dtype=torch.float32)' in commit.files["README.md"].decode()
    assert hub.commits[0].summary.startswith("Upload QuAILoRA bundle (nf4, r=4, solver=exact)")


@pytest.mark.parametrize("damage,message", [
    (lambda b: (b / INIT_ADAPTER_CONFIG).unlink(), INIT_ADAPTER_CONFIG),
    (lambda b: (b / INIT_ADAPTER_WEIGHTS).unlink(), INIT_ADAPTER_WEIGHTS),
    (lambda b: (b / INIT_ADAPTER_CONFIG).rename(b / ADAPTER_CONFIG), "the layout of quailora-convert before"),
    (lambda b: (b / "quailora_report.json").unlink(), "quailora_report.json"),
    (lambda b: sorted(b.glob("model-*.safetensors"))[-1].unlink(), "model-0000"),
    (lambda b: (b / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((b / "config.json").read_text()).items() if k != "quantization_config"})),
     "quantization_config"),
])
def test_incomplete_bundles_are_refused_before_any_request(bundle, hub, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    damage(broken)
    with pytest.raises(BadInputError, match=message):
        push_to_hub(broken, REPO)
    assert hub.requests == []


@pytest.mark.parametrize("setup,message", [
    (lambda hub, mp: mp.delenv("HF_TOKEN"), "not logged in to the Hub: set HF_TOKEN"),
    (lambda hub, mp: mp.setenv("HF_TOKEN", "hf_wrong"), "did not accept your credentials"),
    (lambda hub, mp: hub.forbidden_namespaces.add("alice"), "permission denied"),
])
def test_hub_errors_become_one_actionable_line(bundle, hub, monkeypatch, capsys, setup, message):
    setup(hub, monkeypatch)
    with pytest.raises(HubPublishError, match=message):
        push_to_hub(bundle, REPO)
    monkeypatch.delenv("QUAILORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["push-to-hub", str(bundle), REPO])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert hub.commits == []


def test_repo_id_needs_a_namespace(bundle, hub):
    with pytest.raises(BadInputError, match="namespace/name"):
        push_to_hub(bundle, "just-a-name")
    assert hub.requests == []


def test_cli_runner_pushes(bundle, hub):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["push-to-hub", str(bundle), REPO, "--private", "--revision", "exp",
                                      "--commit-message", "via typer"])
    assert result.exit_code == 0, result.output
    assert f"to {REPO}@exp" in result.output and 'revision="exp"' in result.output
    assert hub.repos[REPO]["private"] and hub.commits[-1].summary == "via typer" and hub.commits[-1].revision == "exp"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_console_script_pushes_over_a_real_socket(bundle, tmp_path):
    hub = FakeHub()
    server = make_server("127.0.0.1", 0, hub, handler_class=_QuietHandler)
    hub.endpoint = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        command = [shutil.which("quailora-convert")] if shutil.which("quailora-convert") else [sys.executable, "-m", "quailora_cli"]
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
               "HF_TOKEN_PATH": str(tmp_path / "no-token")}
        env.pop("QUAILORA_DEBUG", None)
        result = subprocess.run(command + ["push-to-hub", str(bundle), REPO, "--private", "--revision", "dev",
                                           "--commit-message", "from a subprocess"],
                                capture_output=True, text=True, env=env, timeout=300)
        refused = subprocess.run(command + ["push-to-hub", str(tmp_path), REPO], capture_output=True, text=True,
                                 env=env, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert hub.repos[REPO]["private"] and [c.summary for c in hub.commits] == ["from a subprocess"]
    assert json.loads(hub.commits[0].files[INIT_ADAPTER_CONFIG])["revision"] == "dev"
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "not a complete" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
