"""Models by Hugging Face name: ``owner/repo[:QUANT]`` or ``owner/repo/file.gguf`` to a GGUF in the local cache.

The forms are llama.cpp's ``-hf owner/repo[:quant]`` (common/arg.cpp:3059-3067) and a file of a repository.
Files are fetched by huggingface_hub into its cache (``HF_HOME``/``HF_HUB_CACHE``), with its progress bar,
and found there again without asking the Hub under ``HF_HUB_OFFLINE=1`` or when the Hub is unreachable.
Every part of a split model is fetched beside the first. A path that exists always wins.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import HubError, HubNotCachedError, HubNotInstalledError
from .gguf_split import PART_NAME

# an HF repository id: owner/name, each of letters, digits, '-', '_', '.' (huggingface_hub's validate_repo_id)
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_TAG = re.compile(rf"^({_NAME}/{_NAME})(?::([A-Za-z0-9_.-]+))?$")
_REPO_FILE = re.compile(rf"^({_NAME}/{_NAME})/(.+\.gguf)$")
# llama.cpp's choice when no quantization is named (common/download.cpp:655-663)
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
# files that are GGUFs but not a model (common/download.cpp:637-653)
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


def parse(ref: str) -> tuple[str, str | None, str | None] | None:
    """``(repo, quant, file)`` of a Hugging Face reference, or None when ``ref`` does not have that form
    (absolute, ``./``-relative, or a ``dir/name.gguf`` path)."""
    if ref.startswith(("/", ".", "~")) or "\\" in ref:
        return None
    if m := _REPO_FILE.match(ref):
        return m.group(1), None, m.group(2)
    if ref.endswith(".gguf"):          # two components ending in .gguf: a relative path, not a repository
        return None
    if m := _REPO_TAG.match(ref):
        return m.group(1), m.group(2), None
    return None


def resolve(model: str | os.PathLike[str]) -> Path:
    """The local path of ``model``: itself when it exists or is not a Hugging Face reference (the loader
    then says it does not exist); otherwise the GGUF it names, fetched into the cache if need be (the first
    part of a split model, the others beside it)."""
    path = Path(model)
    ref = parse(os.fspath(model))
    if path.exists() or ref is None:
        return path
    repo, quant, file = ref
    hub = _hub()
    files = _repo_files(hub, repo)
    offline = _offline(hub)
    where = f"{model} is not a local file; as a Hugging Face reference: {repo}"
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    missing = HubNotCachedError if offline else HubError     # offline, the Hub may have what the cache lacks
    if file is None:
        file = pick(files, quant)
        if file is None:
            what = f"no GGUF of quantization {quant}" if quant else "no GGUF model file"
            raise missing(f"{where} has {what}{_cached_only(offline)}; its GGUFs: {', '.join(ggufs) or 'none'}")
    elif file not in files:
        raise missing(f"{where} has no file {file}{_cached_only(offline)}; its GGUFs: {', '.join(ggufs) or 'none'}")
    paths = [_download(hub, repo, f) for f in split_files(files, file, offline, where)]
    return paths[0]


def pick(files: list[str], quant: str | None) -> str | None:
    """The model file llama.cpp's ``-hf repo[:quant]`` picks (find_best_model, common/download.cpp:655-694):
    the first model GGUF whose path contains the quantization followed by '.' or '-' (any case), trying
    Q4_K_M then Q8_0 when none is named, else, only when none is named, the first model GGUF; of a split
    model, its first part. ``files`` in sorted order (llama.cpp takes the Hub's listing order, also sorted)."""
    models = [f for f in sorted(files) if _is_model(f) and _part(f)[1] == 1]
    for tag in [quant] if quant else DEFAULT_QUANTS:
        pattern = re.compile(re.escape(tag) + "[.-]", re.IGNORECASE)
        for f in models:
            if pattern.search(f):
                return f
    return models[0] if models and not quant else None


def split_files(files: list[str], first: str, offline: bool = False, where: str = "") -> list[str]:
    """``first`` and, when it is the first part of a split model, every other part, in order
    (get_split_files, common/download.cpp:524-540); a missing part is an error."""
    prefix, index, count = _part(first)
    if count == 1:
        return [first]
    want = [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    have = {f.lower(): f for f in files}
    missing = [w for w in want if w.lower() not in have]
    if missing:
        cls = HubNotCachedError if offline else HubError
        raise cls(f"{where}: split model {first} lacks part(s) {', '.join(missing)}{_cached_only(offline)}")
    return [have[w.lower()] for w in want]


def _part(path: str) -> tuple[str, int, int]:
    """(prefix, index from 1, count) of a GGUF file name; (name without .gguf, 1, 1) when not a part."""
    if m := PART_NAME.match(path):
        return m.group(1), int(m.group(2)), int(m.group(3))
    return path.removesuffix(".gguf"), 1, 1


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and not any(k in name for k in _NOT_MODELS)


def _cached_only(offline: bool) -> str:
    return " among the files in the local cache (the Hub was not asked: offline)" if offline else ""


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubNotInstalledError("a Hugging Face model reference needs huggingface_hub: "
                                   "pip install 'ggml-lora[hf]'") from None
    return huggingface_hub


def _offline(hub) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (at its import, as for every library built on it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(hub, repo: str) -> list[str]:
    """The repository's files: from the Hub, or from the cached snapshot of its main branch when offline or
    when the Hub cannot be reached (as llama.cpp falls back to its cache, common/download.cpp:702-709)."""
    if not _offline(hub):
        from huggingface_hub import errors
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        # the HTTP client's base error (httpx2's in huggingface_hub 2.x, httpx's or requests' before)
        unreachable = (getattr(errors, "HTTPError", OSError), OSError)
        try:
            return hub.list_repo_files(repo)
        except RepositoryNotFoundError:
            raise HubError(f"no Hugging Face repository {repo} (or it is private or gated: log in with "
                           "`hf auth login` or set HF_TOKEN)") from None
        except HfHubHTTPError as e:
            raise HubError(f"the Hub refused to list {repo}: {e}") from None
        except unreachable:
            pass                        # what the cache has
    return _cached_files(hub, repo)


def _cached_files(hub, repo: str) -> list[str]:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)       # HF_HUB_CACHE, else HF_HOME/hub
    folder = cache / repo_folder_name(repo_id=repo, repo_type="model")
    ref = folder / "refs" / "main"
    if not ref.is_file():
        raise HubNotCachedError(f"{repo} is not in the Hugging Face cache ({cache}) and the Hub cannot be asked "
                                "(HF_HUB_OFFLINE is set, or the Hub is unreachable)")
    snapshot = folder / "snapshots" / ref.read_text().strip()
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir())


def _download(hub, repo: str, file: str) -> Path:
    """The cached file, fetched first if need be (huggingface_hub's progress bar shows while it downloads)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hub.hf_hub_download(repo, file))
    except LocalEntryNotFoundError:
        raise HubNotCachedError(f"{repo}/{file} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                                "and the Hub cannot be asked (HF_HUB_OFFLINE is set, or the Hub is unreachable)") from None
