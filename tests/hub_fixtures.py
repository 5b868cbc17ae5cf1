"""Fixtures for the Hub tests: the loopback Hub server and a client process that talks to it.

Why a second process: the test session runs with HF_HUB_OFFLINE=1 (tests/conftest.py), and huggingface_hub
reads that and HF_ENDPOINT once, at import. Rather than patch the library, the networked steps (upload,
snapshot_download, transformers/peft `from_pretrained(repo_id)`) run in one long-lived Python process started
with the environment a user would have: online, HF_ENDPOINT pointing at the loopback server, its own HF_HOME
(so no stored login of the machine leaks in) and no HF_TOKEN unless a call sets one. The process imports
torch once and serves calls over a pipe; everything it prints goes to a log file the tests scan for the token.

Run as `python hub_fixtures.py --worker` it is that process; imported, it provides the fixtures.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

ALICE_TOKEN = "hf_alice" + secrets.token_hex(16)  # write access to alice/* and cadenza-test/*
BOB_TOKEN = "hf_bob" + secrets.token_hex(16)  # a valid token of another user
ORG = "cadenza-test"


# ============================================================================================ test side
class RemoteError(Exception):
    """An exception raised in the client process: `types` holds its class and base class names."""

    def __init__(self, types: list[str], message: str, tb: str):
        super().__init__(f"{types[0]}: {message}\n--- in the client process ---\n{tb}")
        self.types, self.message = types, message


class HubClient:
    """Calls functions in the client process: `call("cadenza.share.hub:upload_to_hf_hub", ...)` or the name of a
    `remote_*` helper below. Arguments and results travel as JSON."""

    def __init__(self, endpoint: str, home: Path, python: str = sys.executable):
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "client.log"
        self.env = env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(home / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1", CADENZA_CACHE_DIR=str(home / "cadenza-cache"),
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([python, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, cwd=Path(__file__).resolve().parents[1])

    def run_command(self, argv: list[str], **env: str) -> subprocess.CompletedProcess:
        """A command (e.g. the `cadenza` CLI) in the same environment as the client process."""
        return subprocess.run(argv, env={**self.env, **env}, capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])

    def call(self, fn: str, *args, env: Optional[dict] = None, **kwargs) -> Any:
        """env: variables set (value) or removed (None) for this call only."""
        request = json.dumps({"fn": fn, "args": args, "kwargs": kwargs, "env": env or {}}, default=str)
        self.proc.stdin.write(request.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process died; its log:\n{self.output()[-4000:]}")
        reply = json.loads(line)
        if "error" in reply:
            err = reply["error"]
            raise RemoteError(err["types"], err["message"], err["traceback"])
        return reply["ok"]

    def output(self) -> str:
        """Everything the client process printed or logged so far."""
        return self.log_path.read_bytes().decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        if self.proc.poll() is None:
            self.proc.kill()
        self._log.close()


def _fixtures():
    import pytest

    from hub_server import HubServer

    @pytest.fixture(scope="module")
    def hub(tmp_path_factory):
        server = HubServer(tmp_path_factory.mktemp("hub"), tokens={ALICE_TOKEN: "alice", BOB_TOKEN: "bob"},
                           orgs={"alice": [ORG]})
        with server:
            yield server

    @pytest.fixture(scope="module")
    def client(hub, tmp_path_factory):
        c = HubClient(hub.url, tmp_path_factory.mktemp("client"))
        yield c
        c.close()

    return hub, client


if __name__ != "__main__":
    hub, client = _fixtures()


# ========================================================================================= client side
def remote_build_llm(run_dir: str, base_dir: str, kind: str) -> str:
    """A run folder in the documented layout holding a tiny LoRA adapter or full model on `base_dir`, with
    the extras a real run has (statistics, a checkpoint/ folder and PEFT's README, none of which is uploaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run, model_dir = Path(run_dir), Path(run_dir) / "model"
    weights = model_dir / "model_weights"
    weights.mkdir(parents=True)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if kind == "adapter":
        import peft

        # random B (init_lora_weights=False) so the adapter really changes the logits the test compares
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM", init_lora_weights=False))
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(weights)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(weights)
    GenerationConfig(max_new_tokens=16, do_sample=False).save_pretrained(weights)
    config = _llm_config(base_dir, kind)
    _write_cadenza_files(model_dir, "llm", config, {"answer": {"prompt_template": config["prompt"]["template"]}})
    _write_run_files(run, config)
    (weights / "README.md").write_text("PEFT boilerplate card\n")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.json").write_text("{}")
    return str(run)


def _llm_config(base_dir: str, kind: str) -> dict:
    from cadenza.config.load import render_config

    config = {"model_type": "llm", "base_model": base_dir,
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "prompt": {"template": "Q: {question}\nA:"}, "trainer": {"type": "finetune", "epochs": 2}}
    if kind == "adapter":
        config["adapter"] = {"type": "lora", "r": 4}
    return render_config(config)


def remote_build_ecd(run_dir: str, bert_dir: str) -> str:
    """A run folder with an ecd model: head weights, a LoRA adapter on the text encoder, metadata."""
    import peft
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel

    from cadenza.config.load import render_config

    run, model_dir = Path(run_dir), Path(run_dir) / "model"
    (model_dir / "encoders").mkdir(parents=True)
    torch.manual_seed(2)
    save_file({"combiner.fc.weight": torch.randn(8, 32), "outputs.sentiment.weight": torch.randn(2, 8)},
              str(model_dir / "model_weights.safetensors"))
    encoder = peft.get_peft_model(AutoModel.from_pretrained(bert_dir),
                                  peft.LoraConfig(r=2, target_modules=["query", "value"]))
    encoder.save_pretrained(model_dir / "encoders" / "review")
    config = render_config({
        "model_type": "ecd",
        "input_features": [{"name": "review", "type": "text",
                            "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": bert_dir,
                                        "adapter": {"type": "lora", "r": 2}}}],
        "output_features": [{"name": "sentiment", "type": "category"}],
        "trainer": {"epochs": 2}})
    _write_cadenza_files(model_dir, "ecd", config, {"sentiment": {"idx2str": ["fresh", "rotten"]}})
    _write_run_files(run, config)
    return str(run)


def _write_cadenza_files(model_dir: Path, model_type: str, config: dict, metadata: dict) -> None:
    from cadenza.artifacts import write_json

    write_json(model_dir / "cadenza_model.json", {"model_type": model_type, "cadenza_version": "0.1.0", "format": 1})
    write_json(model_dir / "model_hyperparameters.json", config)
    write_json(model_dir / "training_set_metadata.json", metadata)


def _write_run_files(run: Path, config: dict) -> None:
    from cadenza.artifacts import write_json

    output = config["output_features"][0]["name"]
    write_json(run / "training_statistics.json", {
        "training": [{"loss": 1.5}, {"loss": 0.75}],
        "validation": [{output: {"loss": 1.25, "accuracy": 0.5}}, {output: {"loss": 0.875, "accuracy": 0.625}}],
        "best_epoch": 2, "steps": 10})
    write_json(run / "test_statistics.json", {output: {"loss": 0.9, "accuracy": 0.6}, "combined": {"loss": 0.9}})
    write_json(run / "description.json", {"rows": {"training": 70, "validation": 10, "test": 20},
                                          "platform": "not-for-the-card"})


ECD_WORDS = ["good", "great", "fine", "bad", "awful", "dull", "plot", "actor"]


def remote_ecd_frame(n: int = 48) -> list[dict]:
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = [rng.choice(ECD_WORDS) for _ in range(5)]
        score = sum(w in ("good", "great") for w in words) - sum(w in ("bad", "awful") for w in words)
        rows.append({"review": " ".join(words), "x": rng.gauss(0, 1), "sentiment": "pos" if score > 0 else "neg"})
    return rows


def remote_train_ecd(output_directory: str, bert_dir: str) -> str:
    """A real Cadenza ecd run (LoRA on the text encoder, a number input, a category output) via the API."""
    import pandas as pd

    from cadenza import Model

    config = {
        "input_features": [
            {"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 12},
             "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": bert_dir,
                         "adapter": {"type": "lora", "r": 2}}},
            {"name": "x", "type": "number"}],
        "output_features": [{"name": "sentiment", "type": "category"}],
        "trainer": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01},
    }
    out, _ = Model(config, log=lambda _: None).experiment(pd.DataFrame(remote_ecd_frame()),
                                                           output_directory=output_directory)
    return str(out.run_dir)


LLM_ROWS = [{"question": f"what comes after {i}", "answer": str(i + 1)} for i in range(16)]


def remote_train_llm(output_directory: str, base_dir: str, kind: str) -> str:
    """A real Cadenza llm run on the tiny Llama: a LoRA adapter, the adapter merged, or full fine-tuning."""
    import pandas as pd

    from cadenza import Model

    config = {"model_type": "llm", "base_model": base_dir,
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "prompt": {"template": "Q: {question}\nA:"}, "generation": {"max_new_tokens": 3},
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": 8, "learning_rate": 0.05}}
    if kind != "full":
        config["adapter"] = {"type": "lora", "r": 4,
                             "postprocessor": {"merge_adapter_into_base_model": kind == "merged"}}
    out = Model(config, log=lambda _: None).train(pd.DataFrame(LLM_ROWS), output_directory=output_directory)
    return str(out.run_dir)


def remote_causal_lm_logits(source: str, base: Optional[str] = None, text: str = "Q: What is Cadenza?\nA:") -> dict:
    """Logits of a causal LM loaded with plain transformers (and PEFT when `base` is given), from a local
    folder or a Hub repo id, plus its tokenizer's ids for `text` (the tokenizer comes from `source` too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), source)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[0]
    return {"ids": ids[0].tolist(), "logits": logits[:, :64].tolist(), "argmax": logits.argmax(-1).tolist()}


def remote_commit(repo_id: str, token: str, add: dict[str, str], delete: list[str]) -> None:
    """Change a repo with plain huggingface_hub, as someone not using Cadenza might: add local files (repo path ->
    local path) and delete repo paths in one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    operations = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in add.items()]
    operations += [CommitOperationDelete(path_in_repo=path) for path in delete]
    HfApi(token=token).create_commit(repo_id, operations=operations, commit_message="by hand")


def remote_store_login(token: str) -> None:
    """`hf auth login` through huggingface_hub's public API (it checks the token with whoami, then stores it)."""
    from huggingface_hub import login

    login(token=token, add_to_git_credential=False)


def remote_cli(argv: list[str]) -> Any:
    """`cadenza upload ...` through the parser `register_cli` builds (cadenza.cli may add more commands)."""
    import argparse

    from cadenza.share.hub import register_cli

    parser = argparse.ArgumentParser(prog="cadenza")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def remote_cadenza_predict(model: str, records: list[dict], from_hub: bool = False, **kwargs) -> list[dict]:
    import pandas as pd

    from cadenza import Model

    loaded = Model.from_pretrained(model, **kwargs) if from_hub else Model.load(model)
    return loaded.predict(pd.DataFrame(records)).to_dict(orient="records")


def _resolve(name: str):
    if ":" in name:
        module, attr = name.split(":")
        return getattr(importlib.import_module(module), attr)
    return globals()[name]


@contextlib.contextmanager
def _env(changes: dict):
    saved = {k: os.environ.get(k) for k in changes}
    for k, v in changes.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _serve() -> None:
    # replies get a private copy of stdout; fd 1 then points at the log, so stray prints cannot corrupt them
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            with _env(request["env"]):
                result = _resolve(request["fn"])(*request["args"], **request["kwargs"])
            reply = {"ok": json.loads(json.dumps(result, default=str))}
        except BaseException as e:  # reported to the test, which decides
            reply = {"error": {"types": [c.__name__ for c in type(e).__mro__], "message": str(e),
                               "traceback": traceback.format_exc()}}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        print(f"--- end of call {request['fn']}", flush=True)


def remote_embedding_cache_runs_from_hub(output_directory: str, bert_dir: str, repo_id: str, token: str) -> list:
    """Publish a plain encoder folder to the Hub, then train a frozen-encoder ecd model from its repo id twice:
    [(cache hits, misses) of each run]."""
    import pandas as pd
    from huggingface_hub import HfApi

    from cadenza import Model

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=bert_dir, ignore_patterns=[".complete"])
    config = {"input_features": [{"name": "review", "type": "text", "preprocessing": {"max_sequence_length": 12},
                                  "encoder": {"type": "auto_transformer", "pretrained_model_name_or_path": repo_id}}],
              "output_features": [{"name": "sentiment", "type": "category"}], "trainer": {"epochs": 1}}
    runs = []
    for _ in range(2):
        model = Model(config, log=lambda _: None)
        model.train(pd.DataFrame(remote_ecd_frame()), output_directory=output_directory)
        runs.append([model.model.cache_stats.hits, model.model.cache_stats.misses])
    return runs


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()

