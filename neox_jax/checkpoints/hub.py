"""Model ids on the Hugging Face hub (`EleutherAI/pythia-410m`) -> a local snapshot directory.

`huggingface_hub` does the work, so its conventions hold: its cache (`HF_HOME`, `HF_HUB_CACHE`), offline mode
(`HF_HUB_OFFLINE=1`: the cache only), revisions (a branch, tag or commit: Pythia's `step143000`), tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from .stream import CheckpointError

# ORG/NAME as the hub spells repository ids; anything else (./dir, /abs/path, a/b/c) is only ever a path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a GPT-NeoX directory needs: config.json, tokenizer.json and the safetensors weights (not the .bin copies).
_FILES = ["*.json", "*.safetensors"]


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot of `repo_id` at `revision` (default: main) in the hub cache, downloaded unless offline."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_FILES))
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: the Hugging Face hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such directory, and no such model on the Hugging Face hub (a private "
                              f"or gated one needs `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id}: no such directory, and not in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}){at}; {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # ValueError: an id or revision the hub refuses
        raise CheckpointError(f"{repo_id}: download from the Hugging Face hub failed{at} "
                              f"({str(e).strip().splitlines()[0]})") from None
