"""HF model directories: locate (local or hub), read ``config.json`` / safetensors / the
tokenizer, and write an HF directory atomically.

Weights are read with ``safetensors.numpy`` (never torch) from ``model.safetensors`` or the
shards of ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

#: files whose presence means "this directory has a tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the hub.

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local HF model directory for ``name_or_path`` (a directory, or a hub id downloaded
    with ``huggingface_hub.snapshot_download`` when the hub is reachable).

    Raises:
        FileNotFoundError: a local-looking path that does not exist, or a file.
        OSError: a hub id while offline (``HF_HUB_OFFLINE``) or when the download fails.

    Example:
        >>> resolve_model_dir("tests/golden/tiny_roberta").name
        'tiny_roberta'
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    s = str(name_or_path)
    if p.exists():
        raise FileNotFoundError(
            f"{s} is a file; expected an HF model directory (config.json + model.safetensors)."
        )
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"Model directory {s} does not exist.")
    if hub_offline():
        raise OSError(
            f"{s!r} is not a local directory and the Hugging Face hub is offline "
            "(HF_HUB_OFFLINE is set). Download the model where the hub is reachable "
            "(e.g. `hf download <id> --local-dir DIR`) and pass the local directory DIR instead."
        )
    from huggingface_hub import snapshot_download  # only for hub ids (slow to import)

    try:
        path = snapshot_download(
            repo_id=s,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            etag_timeout=10,
        )
    except Exception as e:  # network, auth, missing repo
        raise OSError(
            f"Could not fetch {s!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local HF directory (config.json + model.safetensors) instead."
        ) from e
    return Path(path)


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF directory as a dict.

    Example:
        >>> read_config("tests/golden/tiny_roberta")["model_type"]
        'roberta'
    """
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"No config.json in {model_dir}; an HF model directory needs "
            "config.json and model.safetensors (or a sharded index)."
        )
    return json.loads(f.read_text())


def read_safetensors(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of the shards listed in
    ``model.safetensors.index.json``, as numpy arrays.

    Example:
        >>> sorted(read_safetensors("tests/golden/tiny_roberta"))[0]
        'classifier.dense.bias'
    """
    d = Path(model_dir)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return _load_file(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{index} is not a valid safetensors index (a JSON object with a "
                f"'weight_map'): {type(e).__name__}: {e}"
            ) from None
        out: dict[str, np.ndarray] = {}
        for s in shards:
            if not (d / s).is_file():
                raise FileNotFoundError(f"Shard {s} listed in {index} is missing.")
            out.update(_load_file(d / s))
        return out
    raise FileNotFoundError(
        f"No weights in {d}: expected model.safetensors or model.safetensors.index.json "
        "(pytorch_model.bin is not supported: it needs torch)."
    )


def _load_file(path: Path) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file``; a truncated or damaged file is a ``ValueError`` that
    names it (safetensors' own error names no file)."""
    try:
        return dict(load_file(path))
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}; {path.stat().st_size:,} bytes): "
            "it may be truncated or damaged (an interrupted download or copy); fetch it again."
        ) from None


def load_tokenizer(model_dir: str | os.PathLike) -> Any | None:
    """``AutoTokenizer.from_pretrained(model_dir)`` if it has tokenizer files, else ``None``.

    Example:
        >>> load_tokenizer("tests/golden/tiny_roberta") is None
        True
    """
    d = Path(model_dir)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # only when there is a tokenizer (slow to import)

    return AutoTokenizer.from_pretrained(str(d))


def _write_atomic(out_dir: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Runs each writer into a temporary directory inside ``out_dir``, then moves every file
    into ``out_dir`` with ``os.replace`` (each file appears whole or not at all).

    The files get the usual mode for new files (``0o666`` less the umask): some writers
    (``safetensors.numpy.save_file``) create them ``0o600``, which the moved file would keep.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-export-") as tmp:
        for name, write in writers.items():
            write(Path(tmp) / name)
        # The umask, read without changing it (os.umask would, for every thread).
        probe = Path(tmp) / ".mode-probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = probe.stat().st_mode & 0o777
        probe.unlink()
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                os.chmod(f, mode)
                os.replace(f, out_dir / f.name)


def write_hf_dir(
    out_dir: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    tokenizer: Any | None = None,
) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer files; each is written
    in a temporary directory inside ``out_dir`` and then ``os.replace``-d.

    Example:
        >>> d = write_hf_dir(tempfile.mkdtemp(), {"model_type": "llama"}, {"w": np.zeros(2)})
        >>> sorted(p.name for p in d.iterdir()), sorted(read_safetensors(d))
        (['config.json', 'model.safetensors'], ['w'])
    """
    out = Path(out_dir)
    writers: dict[str, Callable[[Path], None]] = {
        "config.json": lambda p: p.write_text(json.dumps(dict(config), indent=2, sort_keys=True)),
        "model.safetensors": lambda p: save_file(dict(tensors), str(p), metadata={"format": "pt"}),
    }
    if tokenizer is not None:

        def tok(p: Path) -> None:
            sub = p.parent / "tok"
            tokenizer.save_pretrained(str(sub))
            for f in sub.iterdir():
                shutil.move(str(f), p.parent / f.name)
            sub.rmdir()

        writers["tokenizer"] = tok
    _write_atomic(out, writers)
    return out
