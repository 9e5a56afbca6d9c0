"""The tiny models: a complete, deterministic Hugging Face cache entry (the real vLLM loading it
is in tests/contract)."""

from __future__ import annotations

import json
import struct

import jinja2
from tokenizers import Tokenizer

from runtimes.storage import RepoCache, snapshot_complete
from runtimes.tiny_model import TinyModel, commit_of, repo_files, write_model


def test_written_once_complete_and_deterministic(tmp_path):
    model = TinyModel("local/tiny-test", seed=7)
    commit, written = write_model(tmp_path, model)
    assert written and len(commit) == 40
    assert snapshot_complete(tmp_path, model.repo_id)  # the gateway starts it offline
    assert write_model(tmp_path, model) == (commit, False)  # idempotent
    assert commit_of(repo_files(model)) == commit  # the same files every time
    assert write_model(tmp_path / "other", TinyModel("local/tiny-test", seed=8))[0] != commit
    snapshot = RepoCache(tmp_path, model.repo_id).snapshot_dir(None)
    assert all((snapshot / name).is_symlink() for name in repo_files(model))


def test_files_are_a_llama_with_its_tokenizer(tmp_path):
    files = repo_files(TinyModel("local/tiny-test", seed=1))
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"] == 128
    weights = files["model.safetensors"]
    assert len(weights) < 2 * 1024 * 1024
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    embed = header["model.embed_tokens.weight"]
    assert embed["dtype"] == "BF16" and embed["shape"] == [config["vocab_size"], 128]
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    assert 8 + length + end == len(weights)
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tokenizer.get_vocab_size() <= config["vocab_size"]
    ids = tokenizer.encode("hello world").ids
    assert ids[0] == config["bos_token_id"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    template = json.loads(files["tokenizer_config.json"])["chat_template"]
    prompt = jinja2.Template(template).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
