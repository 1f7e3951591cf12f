"""Models by Hugging Face name (hub.py): llama.cpp's choice of file for `owner/repo[:QUANT]`, and resolution
through a huggingface_hub cache laid out on disk here, read offline. No test touches the network: every
resolution runs in a child process started with HF_HUB_OFFLINE=1 and HF_HOME in tmp (huggingface_hub reads
both at its import), and the file choice is tested on lists of names."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import N_THREADS
from tinymodels import split_model

from ggml_lora import BaseModel, hub
from ggml_lora.errors import HubNotInstalledError

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# (files in the repository, quant asked, file llama.cpp's find_best_model picks; common/download.cpp:655-694)
PICKS = [
    (["m-Q8_0.gguf", "m-Q4_K_M.gguf", "README.md"], None, "m-Q4_K_M.gguf"),          # the default quant
    (["m-F16.gguf", "m-Q8_0.gguf"], None, "m-Q8_0.gguf"),                            # then Q8_0
    (["mmproj-m-F16.gguf", "m-F16.gguf"], None, "m-F16.gguf"),                      # else the first model file
    (["m-F16.gguf"], "q4_k_m", None),                                               # a named quant: no fallback
    (["m-q4_k_m.gguf", "m-Q8_0.gguf"], "Q4_K_M", "m-q4_k_m.gguf"),                  # any case
    (["m-Q4_K_M_L.gguf", "sub/m-Q4_K_M.gguf"], "Q4_K_M", "sub/m-Q4_K_M.gguf"),     # followed by '.' or '-'
    (["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf"], None, "m-Q8_0-00001-of-00002.gguf"),
    (["imatrix.gguf", "README.md"], None, None),
]


@pytest.mark.parametrize("files,quant,want", PICKS)
def test_pick_follows_llama_cpp(files, quant, want):
    assert hub.pick(files, quant) == want


@pytest.mark.parametrize("ref,want", [
    ("owner/repo", ("owner/repo", None, None)),
    ("owner/repo:Q4_K_M", ("owner/repo", "Q4_K_M", None)),
    ("owner/repo/model-Q8_0.gguf", ("owner/repo", None, "model-Q8_0.gguf")),
    ("owner/repo/sub/m.gguf", ("owner/repo", None, "sub/m.gguf")),
    ("models/tiny.gguf", None), ("./owner/repo", None), ("/abs/path.gguf", None), ("model.gguf", None),
    ("owner", None), ("owner/repo:", None),
])
def test_parse_reference(ref, want):
    assert hub.parse(ref) == want


def cache_repo(hf_home: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """huggingface_hub's cache layout (file_download.py, hf_hub_download's docstring): blobs named by their
    hash, refs/main holding the commit, snapshots/<commit>/<file> a relative symlink to its blob."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def offline(hf_home: Path, code: str, cwd: Path | None = None) -> dict:
    """Runs `code` (which sets `out`) in a child process offline with HF_HOME=hf_home; returns `out`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    script = "import json\nfrom ggml_lora import hub\nout = {}\n" + textwrap.dedent(code) + "\nprint(json.dumps(out))"
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


RESOLVE_ALL = """
for ref in REFS:
    try:
        out[ref] = str(hub.resolve(ref))
    except Exception as e:
        out[ref] = f"{type(e).__name__}: {e}"
"""


@pytest.fixture(scope="module")
def hf_home(tiny_model_file, tmp_path_factory):
    """A cache with a repository of several quantizations, one with only F16 and a projector, one
    without GGUFs, a split model, and a split model whose second part was never fetched."""
    home = tmp_path_factory.mktemp("hf")
    q8 = tiny_model_file("gemma3", "q8_0", n_layers=2)
    f32 = tiny_model_file("gemma3", "f32", n_layers=2)
    parts = split_model(q8, tmp_path_factory.mktemp("parts") / "tiny-Q8_0.gguf", 10)
    cache_repo(home, "owner/tiny-GGUF", {"tiny-Q8_0.gguf": q8, "tiny-F32.gguf": f32, "README.md": b"# tiny"})
    cache_repo(home, "owner/f16-only", {"mmproj-F16.gguf": b"GGUF", "tiny-F16.gguf": f32})
    cache_repo(home, "owner/no-gguf", {"README.md": b"# nothing"})
    cache_repo(home, "owner/split-GGUF", {f"Q8_0/{p.name}": p for p in parts})
    cache_repo(home, "owner/half-split", {f"Q8_0/{parts[0].name}": parts[0]})
    return home, q8, f32, parts


def test_references_resolve_offline(hf_home):
    home, q8, f32, parts = hf_home
    snap = home / "hub"
    refs = ["owner/tiny-GGUF", "owner/tiny-GGUF:f32", "owner/tiny-GGUF/tiny-F32.gguf", "owner/f16-only",
            "owner/split-GGUF:Q8_0", "owner/tiny-GGUF:Q5_K_M", "owner/tiny-GGUF/absent.gguf", "owner/no-gguf",
            "owner/not-cached", "owner/half-split"]
    out = offline(home, f"REFS = {refs!r}\n" + RESOLVE_ALL)
    got = {ref: Path(v) for ref, v in out.items() if not v.startswith("Hub")}
    # no quant: Q4_K_M is absent, Q8_0 is there; the files are the cache's own, bytes unchanged
    assert got["owner/tiny-GGUF"] == snap / f"models--owner--tiny-GGUF/snapshots/{COMMIT}/tiny-Q8_0.gguf"
    assert got["owner/tiny-GGUF"].read_bytes() == q8.read_bytes()
    assert got["owner/tiny-GGUF:f32"].read_bytes() == f32.read_bytes()
    assert got["owner/tiny-GGUF/tiny-F32.gguf"] == got["owner/tiny-GGUF:f32"]
    assert got["owner/f16-only"].name == "tiny-F16.gguf"                  # the projector is not a model
    assert got["owner/split-GGUF:Q8_0"].name == parts[0].name             # the first part, the others beside it
    assert all((got["owner/split-GGUF:Q8_0"].parent / p.name).read_bytes() == p.read_bytes() for p in parts)
    errors = {ref: v for ref, v in out.items() if v.startswith("Hub")}
    assert set(errors) == {"owner/tiny-GGUF:Q5_K_M", "owner/tiny-GGUF/absent.gguf", "owner/no-gguf",
                           "owner/not-cached", "owner/half-split"}
    listing = "its GGUFs: tiny-F32.gguf, tiny-Q8_0.gguf"
    assert errors["owner/tiny-GGUF:Q5_K_M"].startswith("HubNotCachedError: owner/tiny-GGUF:Q5_K_M is not a local")
    assert "no GGUF of quantization Q5_K_M among the files in the local cache" in errors["owner/tiny-GGUF:Q5_K_M"]
    assert errors["owner/tiny-GGUF:Q5_K_M"].endswith(listing)
    assert "has no file absent.gguf" in errors["owner/tiny-GGUF/absent.gguf"]
    assert errors["owner/tiny-GGUF/absent.gguf"].endswith(listing)
    assert "no GGUF model file" in errors["owner/no-gguf"] and errors["owner/no-gguf"].endswith("its GGUFs: none")
    assert errors["owner/not-cached"].startswith("HubNotCachedError: owner/not-cached is not in the Hugging Face "
                                                 f"cache ({snap})")
    assert errors["owner/half-split"].startswith("HubNotCachedError: ")
    assert f"lacks part(s) Q8_0/{parts[1].name}" in errors["owner/half-split"]


def test_load_and_cli_take_a_reference(hf_home, tmp_path, capsys):
    """BaseModel.load and `ggml-lora eval --model` on a split model by name: the same logits and loss as
    the single file."""
    from ggml_lora.cli import main

    home, q8, _, parts = hf_home
    tokens = list(range(1, 25))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    eval_args = ["--data", str(text), "--json", "--n-threads", str(N_THREADS)]
    out = offline(home, f"""
        import contextlib, io
        from ggml_lora import BaseModel
        from ggml_lora.cli import main
        with BaseModel.load("owner/split-GGUF:q8_0", n_threads={N_THREADS}) as m:
            out["path"] = str(m.path)
            out["logits"] = m.logits({tokens}).tolist()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            main(["eval", "--model", "owner/split-GGUF:Q8_0", *{eval_args!r}])
        out["eval"] = json.loads(printed.getvalue())
    """)
    assert Path(out["path"]).name == parts[0].name and len(parts) == 3
    with BaseModel.load(q8, n_threads=N_THREADS) as model:
        np.testing.assert_array_equal(np.array(out["logits"], dtype=np.float32), model.logits(tokens))
    assert main(["eval", "--model", str(q8), *eval_args]) == 0
    assert out["eval"] == json.loads(capsys.readouterr().out)


def test_existing_path_wins(hf_home, tmp_path):
    """A local file whose name reads as a reference is loaded as the file, and the cache is not asked."""
    home, _, f32, _ = hf_home
    local = tmp_path / "owner" / "tiny-GGUF" / "tiny-Q8_0.gguf"
    local.parent.mkdir(parents=True)
    local.write_bytes(f32.read_bytes())
    out = offline(home, "out['path'] = str(hub.resolve('owner/tiny-GGUF/tiny-Q8_0.gguf'))", cwd=tmp_path)
    assert out["path"] == "owner/tiny-GGUF/tiny-Q8_0.gguf"


def test_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)        # import huggingface_hub now fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubNotInstalledError, match=r"pip install 'ggml-lora\[hf\]'"):
        BaseModel.load("owner/tiny-GGUF:Q8_0")
    with pytest.raises(FileNotFoundError):              # a path that is not a reference: the usual error
        BaseModel.load("missing.gguf")
