"""Publishing models on the Hub and fetching them back, against a Hub-compatible server on loopback.

Checks that need no network run in this process (it is offline, see conftest); everything that talks to the
server runs in the client process of `hub_fixtures` with the real huggingface_hub, transformers and peft.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cadenza.errors import ModelFolderError
from cadenza.share.hub import HubError, plan_upload, upload_to_hf_hub
from hub_fixtures import ALICE_TOKEN, BOB_TOKEN, ORG, RemoteError, client, hub  # noqa: F401  (fixtures)

UPLOAD = "cadenza.share.hub:upload_to_hf_hub"
DOWNLOAD = "cadenza.share.hub:download_model"
CADENZA_FILES = {"cadenza_model.json", "model_hyperparameters.json", "training_set_metadata.json"}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def built(client, tiny_llama_dir, tiny_bert_dir, tmp_path_factory) -> dict[str, Path]:
    """Run folders in the documented layout, built in the client process (which has torch loaded anyway)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "adapter": Path(client.call("remote_build_llm", str(root / "adapter"), str(tiny_llama_dir), "adapter")),
        "full": Path(client.call("remote_build_llm", str(root / "full"), str(tiny_llama_dir), "full")),
        "ecd": Path(client.call("remote_build_ecd", str(root / "ecd"), str(tiny_bert_dir))),
    }


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# ================================================================================= checks before the network
@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "org/", "/name", "org/-bad", "org/na..me",
                                     "org/has space", "org/" + "x" * 97])
def test_bad_repo_id_is_refused_before_any_request(repo_id, built, hub):
    hub.clear_log()
    with pytest.raises(HubError, match="repo id"):
        upload_to_hf_hub(repo_id, built["adapter"], token=ALICE_TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "model_hyperparameters.json").unlink(), "model_hyperparameters.json is missing"),
    (lambda m: (m / "training_set_metadata.json").write_text("{not json"), "not valid JSON"),
    (lambda m: shutil.rmtree(m / "model_weights"), "model_weights/ is missing"),
    (lambda m: (m / "model_weights" / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    (lambda m: _truncate(m / "model_weights" / "adapter_model.safetensors"), "truncated or damaged"),
    (lambda m: (m / "model_weights" / "adapter_model.safetensors").rename(
        m / "model_weights" / "adapter_model.bin"), "adapter_model.bin: Cadenza loads only safetensors"),
    (lambda m: _edit_json(m / "cadenza_model.json", format=2), "upgrade cadenza"),
    (lambda m: _edit_json(m / "model_weights" / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
                          auto_map={"AutoTokenizer": ["tokenization.CustomTokenizer", None]}),
     "tokenizer_config.json: auto_map asks to run Python code"),
])
def test_incomplete_model_folder_is_named(damage, message, built, hub, tmp_path):
    """The upload runs the same folder check as Model.load (cadenza.artifacts.check_model_folder), before any
    request."""
    model = copy_model(built["adapter"], tmp_path / "run") / "model"
    damage(model)
    hub.clear_log()
    with pytest.raises(ModelFolderError, match=message):
        upload_to_hf_hub("alice/m", model, token=ALICE_TOKEN)
    assert hub.requests == []


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_credentials_in_the_config_are_not_published(built, tmp_path):
    model = copy_model(built["ecd"], tmp_path / "run") / "model"
    path = model / "model_hyperparameters.json"
    config = json.loads(path.read_text())
    config["backend"]["cache_credentials"] = {"s3": {"aws_secret_access_key": "abc"}}
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="backend.cache_credentials holds credentials"):
        plan_upload("alice/m", model)


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        plan_upload("alice/m", tmp_path / "nope")
    with pytest.raises(ModelFolderError, match="not a Cadenza model folder"):
        plan_upload("alice/m", tmp_path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def test_ecd_weights_missing(built, tmp_path):
    model = copy_model(built["ecd"], tmp_path / "run") / "model"
    (model / "model_weights.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model_weights.safetensors is missing"):
        plan_upload("alice/m", model)


def test_offline_mode_is_refused_before_any_request(built, hub):
    from huggingface_hub import is_offline_mode

    if not is_offline_mode():
        pytest.skip("this test session runs online")
    hub.clear_log()
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        upload_to_hf_hub("alice/m", built["adapter"], token=ALICE_TOKEN)
    assert hub.requests == []


def test_no_token_anywhere(client, built, hub):
    hub.clear_log()
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/no-token", str(built["adapter"]))
    assert "HubError" in err.value.types and "hf auth login" in err.value.message
    assert hub.requests == []


def test_token_found_in_a_file_is_not_uploaded(client, built, hub, tmp_path):
    run = copy_model(built["ecd"], tmp_path / "run")
    meta = run / "model" / "training_set_metadata.json"
    meta.write_text(json.dumps({"sentiment": {"idx2str": ["a", "b"]}, "oops": ALICE_TOKEN}))
    hub.clear_log()
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/leaky", str(run), token=ALICE_TOKEN)
    assert "contains your Hugging Face token" in err.value.message and ALICE_TOKEN not in err.value.message
    assert hub.requests == []


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_token_scan_finds_it_across_read_boundaries(chunk, tmp_path):
    from cadenza.share.hub import _file_contains

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x" * 10 + ALICE_TOKEN.encode() + b"y" * 5)
    assert _file_contains(path, ALICE_TOKEN.encode(), chunk=chunk)
    assert not _file_contains(path, BOB_TOKEN.encode(), chunk=chunk)


# ==================================================================================== layout and model card
def test_llm_adapter_layout_and_card(built):
    plan = plan_upload(f"{ORG}/tiny-adapter", built["adapter"])
    files = set(plan.operations_content())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json",
            "generation_config.json", "README.md"} | CADENZA_FILES <= files
    assert not any(f.startswith(("model_weights/", "checkpoint")) for f in files)
    assert "training_statistics.json" not in files
    meta = front_matter(plan.card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "cadenza" in meta["tags"] and "lora" in meta["tags"]
    assert "base_model" not in meta  # a local folder is no Hub id
    assert "PeftModel.from_pretrained(base" in plan.card and f'"{ORG}/tiny-adapter"' in plan.card
    # repo ids name the loopback test Hub's organisation (tests/hub_server.py); the models are built locally
    assert f'Model.from_pretrained("{ORG}/tiny-adapter")' in plan.card
    assert "Q: {question}" in plan.card  # the prompt template users need at inference
    assert "| test | answer | accuracy | 0.6 |" in plan.card
    assert "| validation (epoch 2) | answer | accuracy | 0.625 |" in plan.card
    assert "training 70, validation 10, test 20" in plan.card
    assert "not-for-the-card" not in plan.card


def test_full_llm_and_ecd_cards(built):
    full = plan_upload(f"{ORG}/tiny-full", built["full"])
    assert front_matter(full.card)["library_name"] == "transformers"
    assert {"config.json", "model.safetensors"} <= set(full.operations_content())
    assert f'AutoModelForCausalLM.from_pretrained("{ORG}/tiny-full")' in full.card
    ecd = plan_upload(f"{ORG}/tiny-ecd", built["ecd"] / "model")
    meta = front_matter(ecd.card)
    assert meta["library_name"] == "cadenza" and meta["pipeline_tag"] == "text-classification"
    assert {"model_weights.safetensors", "encoders/review/adapter_config.json",
            "encoders/review/adapter_model.safetensors"} | CADENZA_FILES <= set(ecd.operations_content())
    assert "`fresh`, `rotten`" in ecd.card


def test_packaged_base_model_is_published_by_its_hub_id(built, tmp_path):
    run = copy_model(built["adapter"], tmp_path / "run")
    config_path = run / "model" / "model_hyperparameters.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model": "smollm2"}))
    plan = plan_upload("alice/x", run)
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"  # text the card must contain; nothing is downloaded
    meta = front_matter(plan.card)
    assert meta["base_model"] == hub_id and meta["license"] == "apache-2.0"
    assert f'AutoModelForCausalLM.from_pretrained("{hub_id}")' in plan.card
    # the local path PEFT recorded is replaced in the published adapter_config.json only
    published = json.loads(plan.operations_content()["adapter_config.json"])
    local = json.loads((run / "model" / "model_weights" / "adapter_config.json").read_text())
    assert published["base_model_name_or_path"] == hub_id and Path(local["base_model_name_or_path"]).is_absolute()
    assert {k: v for k, v in published.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in local.items() if k != "base_model_name_or_path"}


# ============================================================================================= round trips
def test_ecd_round_trip_restores_the_folder(client, hub, built):
    repo = f"{ORG}/tiny-ecd"
    client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN)
    folder = Path(client.call(DOWNLOAD, repo))
    original = folder_hashes(built["ecd"] / "model")
    assert folder_hashes(folder) == original


def _max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# ================================================================================ idempotency and revisions
def test_reupload_is_idempotent_and_replaces_stale_files(client, hub, built):
    repo = f"{ORG}/again"
    first = client.call(UPLOAD, repo, str(built["adapter"]), token=ALICE_TOKEN)
    commits = len(hub.repo(repo).history("main"))
    second = client.call(UPLOAD, repo, str(built["adapter"]), token=ALICE_TOKEN)
    assert len(hub.repo(repo).history("main")) == commits  # nothing changed, so no new commit
    assert second.rsplit("/", 1)[-1] == first.rsplit("/", 1)[-1]
    adapter_files = set(hub.files(repo))

    client.call(UPLOAD, repo, str(built["full"]), token=ALICE_TOKEN)
    now = set(hub.files(repo))
    assert "adapter_config.json" not in now and "adapter_model.safetensors" not in now
    assert {"config.json", "model.safetensors", ".gitattributes"} <= now
    assert adapter_files - now == {"adapter_config.json", "adapter_model.safetensors"}


def test_config_asking_for_remote_code_is_refused_on_download(client, hub, built, tmp_path):
    run = copy_model(built["ecd"], tmp_path / "run")
    path = run / "model" / "model_hyperparameters.json"
    config = json.loads(path.read_text())
    config["input_features"][0]["encoder"]["trust_remote_code"] = True
    path.write_text(json.dumps(config))
    repo = f"{ORG}/remote-code"
    client.call(UPLOAD, repo, str(run), token=ALICE_TOKEN)
    with pytest.raises(RemoteError) as err:
        client.call(DOWNLOAD, repo)
    assert "input_features.0.encoder.trust_remote_code: true" in err.value.message
    assert Path(client.call(DOWNLOAD, repo, trust_remote_code=True)).is_dir()


def test_downloaded_pickle_weights_are_refused_not_loaded(client, hub, built, tmp_path):
    """A repo changed by hand to hold pickled weights: the downloaded folder goes through the same check as
    Model.load, so the pickle is named and never unpickled."""
    import torch

    repo = f"{ORG}/pickled"
    client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN)
    pickle = tmp_path / "model_weights.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    client.call("remote_commit", repo, ALICE_TOKEN, add={"model_weights.pt": str(pickle)},
                delete=["model_weights.safetensors"])
    with pytest.raises(RemoteError) as err:
        client.call("remote_cadenza_predict", repo, [], from_hub=True)
    assert "ModelFolderError" in err.value.types
    assert "model_weights.pt: Cadenza loads only safetensors" in err.value.message


def test_dataset_repo_type(client, hub, built):
    repo = f"{ORG}/as-dataset"
    client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN, repo_type="dataset")
    assert "model_weights.safetensors" in hub.files(repo, repo_type="dataset")
    folder = Path(client.call(DOWNLOAD, repo, repo_type="dataset", token=ALICE_TOKEN))
    assert folder_hashes(folder) == folder_hashes(built["ecd"] / "model")


def test_branch_and_pull_request(client, hub, built):
    repo = f"{ORG}/branches"
    client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN)
    main_head = hub.repo(repo).refs["main"]
    client.call(UPLOAD, repo, str(built["adapter"]), token=ALICE_TOKEN, revision="dev")
    assert hub.repo(repo).refs["main"] == main_head
    assert "adapter_config.json" in hub.files(repo, "dev")
    dev = Path(client.call(DOWNLOAD, repo, revision="dev"))
    assert json.loads((dev / "cadenza_model.json").read_text())["model_type"] == "llm"

    pr_url = client.call(UPLOAD, repo, str(built["full"]), token=ALICE_TOKEN, create_pr=True)
    assert pr_url.endswith("/discussions/1")
    assert hub.repo(repo).refs["main"] == main_head
    assert "model.safetensors" in hub.files(repo, "refs/pr/1")


# ======================================================================================= tokens and failures
def test_token_sources_and_private_repo(client, hub, built):
    repo = f"{ORG}/private-one"
    client.call(UPLOAD, repo, str(built["ecd"]), private=True, env={"HF_TOKEN": ALICE_TOKEN})
    assert hub.repo(repo).private
    with pytest.raises(RemoteError) as err:
        client.call(DOWNLOAD, repo)  # anonymous: a private repo looks missing
    assert "HubError" in err.value.types and "401" in err.value.message
    client.call("remote_store_login", ALICE_TOKEN)
    try:
        assert Path(client.call(DOWNLOAD, repo)).is_dir()  # the stored login is used
        client.call(UPLOAD, repo, str(built["ecd"]))
    finally:
        client.call("huggingface_hub:logout")


def test_rejected_token_is_reported_plainly(client, hub, built):
    before = folder_hashes(built["adapter"])
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/wrong-token", str(built["adapter"]), token="hf_wrong" + ALICE_TOKEN[8:])
    message = err.value.message
    assert "HubError" in err.value.types and "HTTP 401" in message and f"{ORG}/wrong-token" in message
    assert hub.url in message and "hf_wrong" not in message
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/not-bobs", str(built["adapter"]), token=BOB_TOKEN)
    assert "HTTP 403" in err.value.message and "write access" in err.value.message
    assert folder_hashes(built["adapter"]) == before


def test_hub_failure_mid_upload_leaves_local_folder_alone(client, hub, built):
    repo = f"{ORG}/flaky"
    before = folder_hashes(built["ecd"])
    hub.fail_next("POST", rf"/api/models/{repo}/commit/", 500)
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN)
    assert "HTTP 500" in err.value.message and "committing" in err.value.message and "try again" in err.value.message
    assert folder_hashes(built["ecd"]) == before
    assert set(hub.files(repo)) == {".gitattributes"}  # the repo was created, nothing half-committed
    client.call(UPLOAD, repo, str(built["ecd"]), token=ALICE_TOKEN)  # and a retry succeeds
    assert "model_weights.safetensors" in hub.files(repo)


@pytest.mark.parametrize("status", [400, 500])
def test_server_message_echoing_the_token_is_relayed_scrubbed(status, client, hub, built):
    """A server (or proxy) that echoes the Authorization header into its error: the HubError relays what the server
    said, and the token is scrubbed from it (and from everything the client printed)."""
    hub.fail_next("POST", r"/api/repos/create", status, echo_authorization=True)
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/echo-{status}", str(built["ecd"]), token=ALICE_TOKEN)
    message = err.value.message
    assert f"HTTP {status}" in message and "you sent Authorization: Bearer ***" in message
    assert ALICE_TOKEN not in str(err.value)  # the message and the client's traceback
    assert ALICE_TOKEN not in client.output()


def test_cli_never_prints_an_echoed_token(client, hub, built):
    import sys

    hub.fail_next("POST", r"/api/repos/create", 400, echo_authorization=True)
    done = client.run_command([sys.executable, "-m", "cadenza", "upload", "hf_hub", "-r", f"{ORG}/echo-cli",
                               "-m", str(built["ecd"])], HF_TOKEN=ALICE_TOKEN)
    assert done.returncode == 2 and "you sent Authorization: Bearer ***" in done.stderr
    assert ALICE_TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize("text, token, expected", [
    ("Authorization: Bearer opaque-credential-123", None, "Authorization: Bearer ***"),
    ("token hf_" + "a1" * 17 + " was echoed", None, "token hf_*** was echoed"),
    ("custom secret s3cr3t-value in a body", "s3cr3t-value", "custom secret *** in a body"),
    ("HTTP 403 from http://127.0.0.1/api/repos/create", "hf_x", "HTTP 403 from http://127.0.0.1/api/repos/create"),
])
def test_scrub_secrets(text, token, expected):
    from cadenza.share.hub import scrub_secrets

    assert scrub_secrets(text, token) == expected


def test_unreachable_hub(client, built):
    with pytest.raises(RemoteError) as err:
        client.call(UPLOAD, f"{ORG}/nowhere", str(built["ecd"]), token=ALICE_TOKEN,
                    env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "could not reach http://127.0.0.1:9" in err.value.message


def test_cli_upload(client, hub, built):
    repo = f"{ORG}/from-cli"
    code = client.call("remote_cli", ["upload", "hf_hub", "-r", repo, "-m", str(built["ecd"]), "-p",
                                      "-c", "from the CLI", "-d", "a description"],
                       env={"HF_TOKEN": ALICE_TOKEN})
    assert code == 0
    head = hub.repo(repo).history("main")[0]
    assert hub.repo(repo).private and head.message == "from the CLI" and head.description == "a description"


def test_cadenza_command(client, hub, built):
    """The installed `cadenza` command wires `upload` in; its output names the commit and never the token."""
    import sys

    repo = f"{ORG}/from-command"
    done = client.run_command([sys.executable, "-m", "cadenza", "upload", "hf_hub", "-r", repo,
                               "-m", str(built["adapter"] / "model")], HF_TOKEN=ALICE_TOKEN)
    assert done.returncode == 0, done.stderr
    assert f"{hub.url}/{repo}/commit/" in done.stdout and "adapter_config.json" in hub.files(repo)
    failed = client.run_command([sys.executable, "-m", "cadenza", "upload", "hf_hub", "-r", repo,
                                 "-m", str(built["adapter"])], HF_TOKEN=BOB_TOKEN)
    assert failed.returncode != 0 and "HTTP 403" in failed.stderr + failed.stdout
    for output in (done.stdout + done.stderr, failed.stdout + failed.stderr):
        assert ALICE_TOKEN not in output and BOB_TOKEN not in output


def test_the_token_never_leaves(client, hub):
    """Runs last in this module: nothing uploaded or printed by any test above contains a token."""
    for token in (ALICE_TOKEN, BOB_TOKEN):
        assert not any(token.encode() in blob for blob in hub.all_blobs())
        assert token not in client.output()
    assert "uploaded:" in client.output()  # the log did capture the uploads


# ===================================================================== trained with Cadenza, loaded from the Hub
def test_trained_ecd_model_from_the_hub_predicts_the_same(client, hub, tiny_bert_dir, tmp_path):
    run = Path(client.call("remote_train_ecd", str(tmp_path / "results"), str(tiny_bert_dir)))
    repo = f"{ORG}/trained-ecd"
    client.call(UPLOAD, repo, str(run), token=ALICE_TOKEN)
    stored = hub.files(repo)
    assert "encoders/review/adapter_model.safetensors" in stored and "checkpoint" not in "".join(stored)
    card = stored["README.md"].decode()
    assert "| test | sentiment | accuracy |" in card and front_matter(card)["library_name"] == "cadenza"

    rows = client.call("remote_ecd_frame", 16)
    local = client.call("remote_cadenza_predict", str(run), rows)
    remote = client.call("remote_cadenza_predict", repo, rows, from_hub=True)
    assert remote == local


@pytest.mark.parametrize("kind", ["adapter", "merged", "full"])
def test_trained_llm_from_the_hub_loads_with_transformers_and_cadenza(kind, client, hub, tiny_llama_dir, tmp_path):
    run = Path(client.call("remote_train_llm", str(tmp_path / "results"), str(tiny_llama_dir), kind))
    local = run / "model" / "model_weights"
    repo = f"{ORG}/trained-llm-{kind}"
    before = folder_hashes(run)
    url = client.call(UPLOAD, repo, str(run), token=ALICE_TOKEN)
    assert url.startswith(hub.url) and "/commit/" in url
    assert folder_hashes(run) == before  # the local folder is only read
    stored = hub.files(repo)
    weights = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    assert stored[weights] == (local / weights).read_bytes()
    assert {"tokenizer.json", "generation_config.json", "README.md"} | CADENZA_FILES <= set(stored)
    assert not any(p.startswith(("model_weights/", "checkpoint")) for p in stored)
    assert front_matter(stored["README.md"].decode())["library_name"] == ("peft" if kind == "adapter" else "transformers")

    base = str(tiny_llama_dir) if kind == "adapter" else None
    expected = client.call("remote_causal_lm_logits", str(local), base=base)
    got = client.call("remote_causal_lm_logits", repo, base=base)
    assert got["ids"] == expected["ids"] and _max_diff(got["logits"], expected["logits"]) < 1e-5
    base_only = client.call("remote_causal_lm_logits", str(tiny_llama_dir))
    assert _max_diff(base_only["logits"], expected["logits"]) > 1e-4  # training changed the model: not trivial

    rows = [{"question": "what comes after 3"}, {"question": "what comes after 7"}]
    assert client.call("remote_cadenza_predict", repo, rows, from_hub=True) == \
        client.call("remote_cadenza_predict", str(run), rows)
    downloaded = Path(client.call(DOWNLOAD, repo))
    assert folder_hashes(downloaded) == {k: v for k, v in folder_hashes(run / "model").items()
                                         if k != "model_weights/README.md"}


def test_untrained_llm_has_nothing_to_publish(built, tmp_path):
    model = copy_model(built["full"], tmp_path / "run") / "model"
    (model / "training_set_metadata.json").write_text(json.dumps({"weights": "base"}))
    with pytest.raises(ModelFolderError, match="not fine-tuned"):
        plan_upload("alice/m", model)


def test_hub_encoder_embeddings_are_cached_under_its_downloaded_revision(client, hub, tiny_bert_dir, tmp_path):
    """An ecd encoder given by Hub id: the first run downloads it before computing the cache key, so the second
    run (same encoder, same texts) takes every embedding from the cache instead of embedding again."""
    first, second = client.call("remote_embedding_cache_runs_from_hub", str(tmp_path / "results"),
                                str(tiny_bert_dir), f"{ORG}/tiny-encoder", ALICE_TOKEN)
    assert first[1] > 0 and second == [first[0] + first[1], 0]
