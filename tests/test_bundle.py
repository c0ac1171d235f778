"""Bundle resolution: layouts, errors that list the places looked at, hf:/gs: sources, gs download (local server)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pi05eval.policy.bundle import (
    Bundle,
    BundleError,
    cache_root,
    fetch_gcs,
    find_norm_stats,
    find_tokenizer,
    parse_source,
    read_model_config,
    resolve_bundle,
)

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path("assets") / "physical-intelligence" / "libero" / "norm_stats.json"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "default-cache"))


def _copy(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
    return dst


# ------------------------------------------------------------------------------------------- sources, cache
def test_parse_source() -> None:
    hf = parse_source("hf:lerobot/pi05_libero")
    assert (hf.kind, hf.location, hf.revision) == ("hf", "lerobot/pi05_libero", None)
    assert parse_source("hf:lerobot/pi05_libero@v1.2").revision == "v1.2"
    gs = parse_source("gs://openpi-assets/checkpoints/pi05_libero/")
    assert (gs.kind, gs.location, gs.path) == ("gs", "openpi-assets", "checkpoints/pi05_libero")
    local = parse_source("~/bundles/x")
    assert local.kind == "local" and local.location == str(Path.home() / "bundles" / "x")
    for bad in ("hf:justaname", "hf:a/b@", "gs://", "s3://bucket/key"):
        with pytest.raises(BundleError):
            parse_source(bad)


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("PI05EVAL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "pi05eval"


# ------------------------------------------------------------------------------------------- local bundles
def test_resolve_tiny_bundle(tiny: Path) -> None:
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model")).get_piece_size()
    b = resolve_bundle(tiny)
    assert isinstance(b, Bundle) and b.root == tiny and b.layout == "openpi"
    assert (b.variant, dict(b.model_overrides)) == ("tiny", {"vocab_size": vocab})
    assert b.model_config.vocab_size == vocab and b.model_config.width == 64
    assert b.norm_stats_path == tiny / ASSETS and b.tokenizer == tiny / "tokenizer.model"
    raw = json.loads((tiny / ASSETS).read_text())["norm_stats"]
    np.testing.assert_array_equal(b.norm_stats["actions"].q01, raw["actions"]["q01"])
    assert b.norm_stats["state"].dim == 8 and b.norm_stats["actions"].dim == 7


@pytest.mark.parametrize("wrapped", [True, False])
def test_top_level_norm_stats_preferred(tiny: Path, tmp_path: Path, wrapped: bool) -> None:
    root = _copy(tiny, tmp_path / "b")
    stats = {"state": {"mean": [0] * 8, "std": [1] * 8}, "actions": {"mean": [5] * 7, "std": [2] * 7}}
    (root / "norm_stats.json").write_text(json.dumps({"norm_stats": stats} if wrapped else stats))
    path, got = find_norm_stats(root)
    assert path == root / "norm_stats.json" and got["actions"].mean.tolist() == [5.0] * 7
    assert got["actions"].q01 is None


def test_missing_norm_stats_lists_every_place(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b", skip=("assets",))
    with pytest.raises(BundleError) as err:
        resolve_bundle(root)
    msg = str(err.value)
    for place in ("norm_stats.json", str(root / ASSETS), str(root / "assets" / "**"), "normalizer_processor"):
        assert place in msg


def test_several_asset_ids_need_a_choice(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b")
    other = root / "assets" / "trossen" / "norm_stats.json"
    other.parent.mkdir(parents=True)
    shutil.copy(root / ASSETS, other)
    (root / ASSETS).unlink()
    (root / "assets" / "mine").mkdir()
    shutil.copy(other, root / "assets" / "mine" / "norm_stats.json")
    with pytest.raises(BundleError, match="asset_id"):
        find_norm_stats(root)
    assert find_norm_stats(root, asset_id="trossen")[0] == other


def test_lerobot_layout_and_normalizer_files(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b", skip=("assets",))
    tensors = load_file(str(root / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in tensors.items()}, str(root / "model.safetensors"))
    stats = {f"observation.state.{s}": torch.full((8,), float(i)) for i, s in enumerate(("mean", "std", "q01", "q99"))}
    save_file(stats, str(root / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    actions = {f"action.{s}": torch.full((7,), 10.0 + i) for i, s in enumerate(("mean", "std", "q01", "q99"))}
    save_file(actions, str(root / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    b = resolve_bundle(root)
    assert b.layout == "lerobot"
    assert b.norm_stats["state"].q99.tolist() == [3.0] * 8 and b.norm_stats["actions"].q01.tolist() == [12.0] * 7


def test_foreign_config_files(tmp_path: Path) -> None:
    assert read_model_config(tmp_path) == ("pi05", {})
    (tmp_path / "config.json").write_text(
        json.dumps({"action_dim": 32, "action_horizon": 10, "paligemma_variant": "gemma_2b",
                    "action_expert_variant": "gemma_300m", "precision": "bfloat16"})
    )  # fmt: skip
    assert read_model_config(tmp_path) == ("pi05", {"action_horizon": 10})
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 50, "n_action_steps": 50}))
    assert read_model_config(tmp_path) == ("pi05", {"action_horizon": 50})
    (tmp_path / "config.json").write_text(json.dumps({"variant": "pi0"}))
    with pytest.raises(BundleError, match="choices: pi05, tiny"):
        read_model_config(tmp_path)


def test_weights_checked_against_config(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b")
    (root / "config.json").write_text(json.dumps({"variant": "tiny", "vocab_size": 1000}))
    with pytest.raises(BundleError, match=r"paligemma\.lm_head\.weight"):
        resolve_bundle(root)
    (root / "config.json").write_text(json.dumps({"variant": "tiny", "widht": 64}))
    with pytest.raises(BundleError, match="widht"):
        resolve_bundle(root)


def test_missing_tokenizer_lists_every_place(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b", skip=("tokenizer.model",))
    cache = tmp_path / "cache"
    with pytest.raises(BundleError) as err:
        resolve_bundle(root, cache)
    msg = str(err.value)
    assert str(root / "tokenizer.model") in msg and "policy.tokenizer" in msg
    assert str(cache / "gs" / "big_vision" / "paligemma_tokenizer.model") in msg
    with pytest.raises(BundleError, match=r"nowhere\.model"):
        resolve_bundle(root, cache, tokenizer=tmp_path / "nowhere.model")
    assert resolve_bundle(root, cache, tokenizer=tiny / "tokenizer.model").tokenizer == tiny / "tokenizer.model"
    # the bundle's own tokenizer wins over the configured one
    assert find_tokenizer(tiny, tmp_path / "other.model") == tiny / "tokenizer.model"


def test_missing_weights_and_directory(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"policy\.checkpoint"):
        resolve_bundle(tmp_path / "absent")
    root = _copy(tiny, tmp_path / "b", skip=("model.safetensors",))
    with pytest.raises(BundleError, match=r"model\.safetensors"):
        resolve_bundle(root)
    (root / "params").mkdir()
    with pytest.raises(BundleError, match="JAX"):
        resolve_bundle(root)


def test_hf_source_unreachable_names_the_option(tmp_path: Path) -> None:
    # Offline: huggingface_hub cannot reach the hub; online: the repo does not exist. Either way a clear error.
    with pytest.raises(BundleError, match=r"policy\.checkpoint"):
        resolve_bundle("hf:pi05eval-tests/no-such-bundle", tmp_path / "cache")


# ------------------------------------------------------------------------------------------- gs:// download
class _Bucket(BaseHTTPRequestHandler):
    """GCS's JSON listing API (2 items per page) and object downloads, served from `objects`."""

    objects: ClassVar[dict[str, bytes]] = {}
    corrupt: ClassVar[set[str]] = set()
    downloads: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "application/octet-stream", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        if url.path == "/storage/v1/b/bkt/o":
            q = urllib.parse.parse_qs(url.query)
            names = sorted(n for n in self.objects if n.startswith(q.get("prefix", [""])[0]))
            start = int(q.get("pageToken", ["0"])[0])
            items = []
            for n in names[start : start + 2]:
                data = self.objects[n] + (b"x" if n in self.corrupt else b"")
                md5 = base64.b64encode(hashlib.md5(self.objects[n]).digest()).decode()
                items.append({"name": n, "size": str(len(data)), "md5Hash": md5})
            page: dict[str, object] = {"items": items}
            if start + 2 < len(names):
                page["nextPageToken"] = str(start + 2)
            return self._send(json.dumps(page).encode(), "application/json")
        name = urllib.parse.unquote(url.path.removeprefix("/bkt/"))
        if name not in self.objects:
            return self._send(b"not found", status=404)
        self.downloads.append(name)
        return self._send(self.objects[name] + (b"x" if name in self.corrupt else b""))


@pytest.fixture
def bucket(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Bucket]]:
    objects = {f"ckpt/{p.relative_to(tiny).as_posix()}": p.read_bytes() for p in tiny.rglob("*") if p.is_file()}
    objects |= {"ckpt/params/_METADATA": b"jax", "ckpt/params/d/0": b"\0" * 100, "ckpt_other/model.safetensors": b""}
    objects |= {"jaxonly/params/_METADATA": b"jax", "jaxonly/assets/x/norm_stats.json": b"{}"}
    handler = type("Bucket", (_Bucket,), {"objects": objects, "corrupt": set(), "downloads": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PI05EVAL_GCS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()
    server.server_close()


def test_gs_bundle_downloads_only_bundle_files(bucket: type[_Bucket], tiny: Path, tmp_path: Path) -> None:
    b = resolve_bundle("gs://bkt/ckpt", tmp_path / "cache")
    root = tmp_path / "cache" / "gs" / "bkt" / "ckpt"
    assert b.root == root and b.variant == "tiny" and b.norm_stats_path == root / ASSETS
    assert sorted(bucket.downloads) == sorted(f"ckpt/{n}" for n in ("model.safetensors", "config.json",
                                                                     "tokenizer.model", ASSETS.as_posix()))  # fmt: skip
    assert (root / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert not (root / "params").exists() and not list(root.rglob("*.part"))
    resolve_bundle("gs://bkt/ckpt", tmp_path / "cache")
    assert len(bucket.downloads) == 4  # cached: nothing fetched again


def test_gs_single_object_as_tokenizer(bucket: type[_Bucket], tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path / "b", skip=("tokenizer.model",))
    got = find_tokenizer(root, "gs://bkt/ckpt/tokenizer.model", tmp_path / "cache")
    assert got == tmp_path / "cache" / "gs" / "bkt" / "ckpt" / "tokenizer.model"
    assert got.read_bytes() == (tiny / "tokenizer.model").read_bytes()


def test_gs_errors(bucket: type[_Bucket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BundleError, match="convert"):
        fetch_gcs("gs://bkt/jaxonly", tmp_path / "c1")
    with pytest.raises(BundleError, match="no bundle files"):
        fetch_gcs("gs://bkt/absent", tmp_path / "c1")
    bucket.corrupt.add("ckpt/config.json")
    with pytest.raises(BundleError, match=r"config\.json is corrupt"):
        fetch_gcs("gs://bkt/ckpt", tmp_path / "c2")
    assert not list((tmp_path / "c2").rglob("config.json*"))
    bucket.corrupt.clear()
    fetch_gcs("gs://bkt/ckpt", tmp_path / "c3")
    monkeypatch.setenv("PI05EVAL_GCS_URL", "http://127.0.0.1:9")  # nothing listens: offline
    with pytest.raises(BundleError, match=r"policy\.checkpoint"):
        fetch_gcs("gs://bkt/ckpt", tmp_path / "c4")
    with pytest.raises(BundleError, match=r"policy\.tokenizer"):
        find_tokenizer(tmp_path, "gs://bkt/ckpt/tokenizer.model", tmp_path / "c4")
    assert fetch_gcs("gs://bkt/ckpt", tmp_path / "c3") == tmp_path / "c3" / "gs" / "bkt" / "ckpt"  # cached copy
