"""MODEL as a Hugging Face Hub id (``org/name``, optionally ``org/name@revision``).

An id is resolved through huggingface_hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``, the layout
``models--org--name/{blobs,refs,snapshots/<commit>}`` that transformers and vLLM share), so a model
another tool already downloaded is not fetched again. Online, only the files a conversion reads
are downloaded (``ALLOW``: safetensors, configs, tokenizer; no duplicate ``.bin`` / ``.pth`` /
``.gguf`` weights, ``IGNORE``), with huggingface_hub's progress bars; offline (``HF_HUB_OFFLINE=1``, or no
network) an id absent from the cache is refused in one line. A local folder always wins over an id
of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from quantkit.errors import InputError

# Hub repo ids: "name" or "org/name" of letters, digits, "-", "_", "." (huggingface_hub's
# validate_repo_id); only the two-part form is taken as an id, so a bare word stays a path.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^\s@]+))?$")
# What a conversion reads: weights as safetensors (and their index), config / generation config /
# tokenizer JSON, SentencePiece models, BPE merges and vocab text, chat templates.
ALLOW = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
# Copies of the same weights in another layout: Mistral's consolidated.safetensors beside the HF
# shards, Meta's original/ folder (consolidated .pth, params.json, its own tokenizer.model).
IGNORE = ["*consolidated*.safetensors", "original/*"]


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """``spec`` as a local path when it exists or is not a Hub id; else the id's snapshot folder
    in the HF cache (downloaded first when online)."""
    path = Path(spec)
    m = HUB_ID.match(str(spec))
    if path.exists() or m is None:
        return path
    return _snapshot(m["repo"], m["rev"])


def _snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = f"{repo}@{revision}" if revision else repo
    cache = constants.HF_HUB_CACHE
    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE)
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise InputError(
            f"{spec}: no such local folder, and this Hub model is not in the Hugging Face cache "
            f"({cache}) while offline ({why})",
            f"download it once with network access (or `hf download {repo}`), or give a local folder",
        ) from None
    except RevisionNotFoundError:
        raise InputError(
            f"{spec}: the Hub model has no revision {revision!r}",
            "give a branch, tag or commit of the repository",
        ) from None
    except GatedRepoError:
        raise InputError(
            f"{spec}: the Hub model is gated",
            "accept its terms on huggingface.co and log in (`hf auth login`) or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{spec}: no such local folder nor Hub model (or it is private)",
            "check the spelling; for a private model log in (`hf auth login`) or set HF_TOKEN",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise InputError(f"{spec}: cannot download from the Hugging Face Hub: {first}") from None


def is_hub_id(spec: str) -> bool:
    return HUB_ID.match(spec) is not None


def hub_source(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) of a snapshot folder in the HF cache
    (``…/models--org--name/snapshots/<commit>``), else None. Repo ids cannot contain "--"
    (huggingface_hub's validate_repo_id), so the folder name maps back to one id."""
    real = path.resolve()
    repo_dir = real.parent.parent
    if real.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
        return None
    return repo_dir.name.removeprefix("models--").replace("--", "/", 1), real.name


def folder_name(path: Path) -> str:
    """The name a model folder goes by in output names: the repository's for a snapshot in the
    HF cache (``org/name`` → ``name``), else the folder's own."""
    src = hub_source(path)
    return src[0].rsplit("/", 1)[-1] if src else path.resolve().name


def model_name(path: Path, config: dict) -> str:
    """A model's own name: config.json's ``_name_or_path`` (its last part), else the folder's
    (``folder_name``)."""
    name = str(config.get("_name_or_path") or "").rstrip("/").split("/")[-1]
    return name or folder_name(path)
