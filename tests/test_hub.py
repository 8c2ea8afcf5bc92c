"""MODEL as a Hub id, resolved offline through a local Hugging Face cache built here in
huggingface_hub's layout (``models--org--name/{blobs,refs,snapshots/<commit>}``, every snapshot
file a relative symlink to its blob): the same bytes as from the folder, ``@revision`` picks a
snapshot, an absent id is refused in one line (exit 2), a local folder wins over an id."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TRAIN_TEXT, make_tiny_model, run_cli

REPO_ID = "tiny-org/tiny-llama"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: Path, repo: str, folder: Path, commit: str, refs: tuple[str, ...]) -> None:
    """``folder``'s files as snapshot ``commit`` of ``repo``, named by ``refs`` (branches, tags)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two revisions of a tiny Llama in a local HF cache: A (sharded, tag v1) and B (main)."""
    root = tmp_path_factory.mktemp("hub")
    a = make_tiny_model(root / "src-a", "LlamaForCausalLM", seed=0)
    b = make_tiny_model(root / "src-b", "LlamaForCausalLM", seed=1)
    # revision A in shards, so the checkpoint reader follows the cache's symlinked shards
    local = root / "tiny-llama"  # the same folder name as the repository: the same output names
    r = run_cli("convert", str(a), "--to", "hf:shard=1MB", "-o", str(local))
    assert r.returncode == 0, r.stderr
    assert (local / "model.safetensors.index.json").is_file()
    cache = root / "cache"
    add_snapshot(cache, REPO_ID, local, COMMIT_A, ("v1",))
    add_snapshot(cache, REPO_ID, b, COMMIT_B, ("main",))
    env = {
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    return dict(root=root, local=local, b=b, env=env)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_hub_id_converts_offline_to_the_folders_bytes(hub):
    root, env = hub["root"], hub["env"]
    outs = {}
    for key, model in (("hub", f"{REPO_ID}@v1"), ("folder", str(hub["local"]))):
        outs[key] = root / f"out-{key}"
        r = run_cli("convert", model, "--to", "gguf:F16", "--to", "hf", "-o", str(outs[key]),
                    env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in outs["hub"].iterdir()) == ["tiny-llama-F16.gguf", "tiny-llama-hf"]
    assert _digest(outs["hub"] / "tiny-llama-hf") == _digest(outs["folder"] / "tiny-llama-hf")
    gguf = "tiny-llama-F16.gguf"  # byte for byte, its general.name included
    assert _digest(outs["hub"])[gguf] == _digest(outs["folder"])[gguf]


def test_revision_picks_a_snapshot(hub):
    root, env = hub["root"], hub["env"]
    got = {}
    for rev in ("", "@v1", f"@{COMMIT_A}", f"@{COMMIT_B}"):
        out = root / f"rev{rev.replace('@', '-')}"
        r = run_cli("convert", REPO_ID + rev, "--to", "hf:f32", "-o", str(out), env=env)
        assert r.returncode == 0, r.stderr
        got[rev] = _tensor_digest(out)
    assert got[""] == got[f"@{COMMIT_B}"] == _tensor_digest(hub["b"])  # main → B
    assert got["@v1"] == got[f"@{COMMIT_A}"] == _tensor_digest(hub["local"])
    assert got["@v1"] != got[""]
    r = run_cli("convert", f"{REPO_ID}@v9", "--to", "hf", "-o", str(root / "v9"), env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _tensor_digest(folder: Path) -> str:
    """The weights by name, whatever the sharding."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    tensors: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].astype("<f4").tobytes())
    return h.hexdigest()


def test_absent_id_refused_offline(hub):
    out = hub["root"] / "absent"
    r = run_cli("convert", "tiny-org/no-such-model", "--to", "gguf:F16", "-o", str(out),
                env=hub["env"])  # fmt: skip
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "tiny-org/no-such-model" in line and "HF_HUB_OFFLINE=1" in line
    assert not out.exists()


def test_local_folder_wins(hub):
    """A folder spelled like the id (relative to the working directory) is used, not the cache."""
    root = hub["root"] / "cwd"
    make_tiny_model(root / REPO_ID, "LlamaForCausalLM", seed=2)
    env = {**os.environ, **hub["env"]}
    env.pop("QUANTKIT_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "quantkit.cli", "convert", REPO_ID, "--to", "hf", "-o", "out"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _tensor_digest(root / "out") == _tensor_digest(root / REPO_ID)


def test_export_and_validate_reference_take_an_id(hub):
    """quantkit.export and `validate --reference` resolve the id the same way."""
    root, env = hub["root"], hub["env"]
    code = (
        "import sys, quantkit\n"
        "r = quantkit.export(sys.argv[1], ['gguf:F32'], sys.argv[2])\n"
        "print(r.artifacts[0].path)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, f"{REPO_ID}@v1", str(root / "api")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    gguf = Path(r.stdout.split()[-1])
    assert gguf.name == "tiny-llama-F32.gguf"
    text = root / "text.txt"
    text.write_text(TRAIN_TEXT)
    rep_path = root / "rep.json"
    r = run_cli("validate", str(gguf), "--reference", f"{REPO_ID}@v1", "--data", str(text),
                "--ctx", "64", "--chunks", "2", "--pp", "0", "--tg", "0", "--no-cache",
                "--json", str(rep_path), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    q = json.loads(rep_path.read_text())["artifacts"][0]["quality"]
    # the F32 file of revision A against revision A in transformers: float noise only (a
    # reference from another snapshot would be off by far more)
    assert q["kld_mean"] < 1e-4, q


def test_shard_names_stay_inside_the_folder(tmp_path):
    """Symlinked shards (the HF cache's) are read; an index naming a file outside is refused."""
    from quantkit.checkpoint import Checkpoint
    from quantkit.errors import CheckpointError

    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    for bad in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        idx = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": bad}}
        (model / "model.safetensors.index.json").write_text(json.dumps(idx))
        with pytest.raises(CheckpointError, match="outside the model folder"):
            Checkpoint.open(model)


def test_recipe_source_may_be_an_id(hub):
    """A recipe's source.model as a Hub id: artifacts named after the repository, the manifest
    and model card record the id and the snapshot's commit."""
    import yaml

    root = hub["root"]
    rec = root / "hub-recipe.yaml"
    body = {
        "name": "hub",
        "source": {"model": f"{REPO_ID}@v1"},
        "output": str(root / "out-recipe"),
        "targets": [{"name": "f16", "type": "F16", "validate": False}],
    }
    rec.write_text(yaml.safe_dump(body, sort_keys=False))
    r = run_cli("run", str(rec), env=hub["env"])
    assert r.returncode == 0, r.stderr
    d = root / "out-recipe" / "f16"
    m = json.loads((d / "manifest.json").read_text())
    assert m["artifact"] == "tiny-llama-F16.gguf"
    assert m["provenance"]["source_hub"] == {"id": REPO_ID, "commit": COMMIT_A}
    assert COMMIT_A in (d / "README.md").read_text()


def test_online_download_asks_only_for_what_converts(monkeypatch, tmp_path):
    """What snapshot_download is asked for, as huggingface_hub filters a repository's files
    (utils.filter_repo_objects): the weights as safetensors once, configs and tokenizer."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from quantkit import hub as qhub

    seen: dict = {}

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert qhub.resolve_model("some-org/some-model@v2") == tmp_path
    assert seen["repo_id"] == "some-org/some-model" and seen["revision"] == "v2"
    repo = [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json", "tokenizer.model", "merges.txt", "vocab.json",
        "chat_template.jinja", "pytorch_model.bin", "model.gguf", "consolidated.safetensors",
        "original/consolidated.00.pth", "original/params.json", "README.md", "flax_model.msgpack",
    ]  # fmt: skip
    got = set(filter_repo_objects(repo, allow_patterns=seen["allow_patterns"],
                                  ignore_patterns=seen["ignore_patterns"]))  # fmt: skip
    assert got == set(repo[:11])
    assert qhub.resolve_model("./not/an-id") == Path("./not/an-id")  # a path stays a path
    assert qhub.resolve_model("a/b/c") == Path("a/b/c")
