"""`moetune push` against a local stand-in for the Hub: the real huggingface_hub client, over HTTP.

`FakeHub` is an HTTP server on 127.0.0.1 that implements the endpoints a push uses (create repo,
create branch, card validation, preupload, the LFS batch / upload / verify steps, commit), checks
the bearer token, records every request and stores what arrives. Each test runs the CLI in a
subprocess with HF_ENDPOINT pointing at it (huggingface_hub reads the endpoint at import), and the
server shuts itself down when the test ends or after a deadline, whichever comes first.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.model_card import write_model_card
from tests.helpers.hub import TOKEN, FakeHub, run_cli

# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def adapter_folder(tmp_path: Path) -> Path:
    """A small adapter folder as moetune writes it: config, weights, metrics, recipe, card."""
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
        },
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "org/base",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps({"eval_loss": 1.25, "perplexity": 3.49}))
    write_model_card(
        folder, base_model="org/base", datasets=["org/data"], recipe={"model": "org/base", "lr": 1e-4}
    )
    return folder


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moetune: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def refusing_endpoint():
    """A port this test holds bound but not listening: connections are refused, and no other process
    can take the port while the test runs (a port closed and remembered could be)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------------- tests


def test_push_uploads_every_file_through_the_real_client(hub, adapter_folder, tmp_path):
    code, out, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/moe-lora", "--private", "--revision", "dev",
        endpoint=hub.url, home=tmp_path / "hf", HF_HUB_VERBOSITY="debug",  # the token must not show even there
    )  # fmt: skip
    assert code == 0, err
    assert "pushed 4 files" in out and "alice/moe-lora (branch dev) [private]" in out
    assert hub.repos["alice/moe-lora"]["private"] is True
    arrived = hub.files("alice/moe-lora", "dev")
    local = {p.name: p.read_bytes() for p in adapter_folder.iterdir()}
    assert set(arrived) == set(local)
    for name, content in local.items():
        if name != "README.md":
            assert arrived[name] == content, name
    # the card that arrived loads from the repo, and the Hub was asked to validate exactly it
    card = arrived["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "alice/moe-lora")' in card and "path/to/this/folder" not in card
    assert hub.validated_cards == [card]
    # safetensors went through the LFS protocol (batch, upload, verify), the rest inline in the commit
    paths = [r["path"] for r in hub.requests]
    assert any(p.endswith(".git/info/lfs/objects/batch") for p in paths)
    assert any(p.startswith("/lfs-upload/") for p in paths)
    # the token went with every call of the push (the client's own registry lookups need none), shown nowhere
    push_calls = [
        r for r in hub.requests if r["path"].startswith(("/api/repos/", "/api/models/", "/api/validate"))
    ]
    assert len(push_calls) >= 5
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in push_calls)
    assert TOKEN not in out + err
    assert all(TOKEN.encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_push_to_an_existing_repo_and_branch(hub, adapter_folder, tmp_path):
    for _ in range(2):  # the second push finds repo and branch there already
        code, out, err = run_cli(
            "push", str(adapter_folder), "--repo-id", "alice/moe-lora", "--revision", "dev",
            endpoint=hub.url, home=tmp_path / "hf",
        )  # fmt: skip
        assert code == 0, err
    assert hub.repos["alice/moe-lora"]["private"] is False
    assert "adapter_model.safetensors" in hub.files("alice/moe-lora", "dev")


def test_dry_run_lists_files_and_sizes_without_token_or_network(hub, adapter_folder, tmp_path):
    code, out, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/moe-lora", "--dry-run",
        endpoint=hub.url, token=None, home=tmp_path / "hf",
    )  # fmt: skip
    assert code == 0, err
    assert "dry run: would upload 4 files" in out
    for path in adapter_folder.iterdir():
        line = next(line for line in out.splitlines() if line.endswith(f"  {path.name}"))
        assert line.split()[-2] in ("B", "KB")  # a size column
    assert "model card: valid" in out and "no Hugging Face token" in out
    assert hub.requests == []


def test_no_token_is_one_line_exit_2(adapter_folder, tmp_path):
    code, out, err = run_cli(
        "push",
        str(adapter_folder),
        "--repo-id",
        "alice/x",
        endpoint="http://127.0.0.1:9",
        token=None,
        home=tmp_path,
    )
    assert code == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in one_error_line(err)


def test_no_network_is_one_line_exit_2(adapter_folder, tmp_path, refusing_endpoint):
    endpoint = refusing_endpoint
    code, out, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/x", endpoint=endpoint, home=tmp_path
    )
    assert code == 2
    line = one_error_line(err)
    assert "cannot reach the Hugging Face Hub" in line and endpoint in line
    assert TOKEN not in out + err


def test_offline_mode_is_one_line_exit_2(adapter_folder, tmp_path):
    code, _, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/x", endpoint="http://127.0.0.1:9", home=tmp_path,
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    assert code == 2 and "HF_HUB_OFFLINE is set" in one_error_line(err)


def test_rejected_token_is_one_line_and_never_shown(hub, adapter_folder, tmp_path):
    bad = "hf_wrongTokenABCDEFGHIJKLMNOPQRSTUVWXYZ"
    code, out, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/x", endpoint=hub.url, token=bad, home=tmp_path
    )
    assert code == 2
    assert "rejected the token (401" in one_error_line(err)
    assert bad not in out + err
    assert hub.repos == {}


def test_a_folder_holding_the_token_is_refused(hub, adapter_folder, tmp_path):
    (adapter_folder / "notes.txt").write_text(f"my token is {TOKEN}\n")
    code, out, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/x", endpoint=hub.url, home=tmp_path
    )
    assert code == 2
    line = one_error_line(err)
    assert "notes.txt contains your Hugging Face token" in line and TOKEN not in out + err
    assert hub.requests == []


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "README.md").write_text("---\ntags: [moe, lora]\nlicense: mit\nlibrary_name: transformers\n---\nx\n"), "library_name"),
        (lambda f: (f / "README.md").write_text("---\n[unclosed\n---\n"), "does not parse"),
        (lambda f: (f / "weights.bin").write_bytes(b"pickle"), "pickle file"),
    ],
)  # fmt: skip
def test_dry_run_validates_the_card(adapter_folder, breakage, message):
    from adapters.errors import MoetuneError
    from adapters.hub import push_folder

    breakage(adapter_folder)
    with pytest.raises(MoetuneError, match=message) as err:
        push_folder(adapter_folder, "alice/x", dry_run=True)
    assert "\n" not in str(err.value)


def test_an_invalid_card_fails_the_cli_dry_run_in_one_line(adapter_folder, tmp_path):
    (adapter_folder / "README.md").write_text("---\n[unclosed\n---\n")
    code, _, err = run_cli(
        "push", str(adapter_folder), "--repo-id", "alice/x", "--dry-run", token=None, home=tmp_path
    )
    assert code == 2 and "does not parse" in one_error_line(err)


def test_bad_repo_id_is_refused(adapter_folder, tmp_path):
    from adapters.errors import MoetuneError
    from adapters.hub import push_folder

    with pytest.raises(MoetuneError, match="needs a namespace"):
        push_folder(adapter_folder, "just-a-name", dry_run=True)
    with pytest.raises(MoetuneError, match="not a valid Hub repo id"):
        push_folder(adapter_folder, "alice/bad name!", dry_run=True)
