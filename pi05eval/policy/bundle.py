"""Policy bundles: where a Pi0.5 checkpoint's weights, config, norm stats and tokenizer come from.

A bundle is a directory holding
* ``model.safetensors`` in openpi's PyTorch key layout or lerobot's (``model.`` prefix),
* optionally ``config.json``: ours (``{"variant": "pi05" | "tiny", ...model config overrides}``), openpi's converted
  checkpoints' (``paligemma_variant``, ``action_horizon``, ...) or lerobot's (``"type": "pi05"``); default pi05,
* norm stats: ``norm_stats.json`` at the top, openpi's ``assets/<asset_id>/norm_stats.json``
  (``{"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}``) or lerobot's normalizer safetensors,
* a SentencePiece ``tokenizer.model`` (openpi checkpoints ship none: then a configured tokenizer is used).

Sources: a local directory, ``hf:<repo_id>[@revision]`` (huggingface_hub ``snapshot_download``) or ``gs://bucket/path``
(public Google Cloud Storage over HTTPS: JSON listing API + object download; only the bundle files are fetched, never
openpi's JAX ``params/``). Downloads go to a cache dir: the argument, else ``$PI05EVAL_CACHE``, else
``~/.cache/pi05eval``; nothing is written unless a remote source is requested. Every check runs in `resolve_bundle`,
before any simulation.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pi05eval.errors import SetupError
from pi05eval.policy.transforms import NormStats

if TYPE_CHECKING:
    from pi05eval.model import Pi05Config

logger = logging.getLogger(__name__)

CACHE_ENV = "PI05EVAL_CACHE"
GCS_URL_ENV = "PI05EVAL_GCS_URL"  # base URL of the GCS HTTP endpoints (tests point it at a local server)
GCS_BASE_URL = "https://storage.googleapis.com"
DEFAULT_ASSET_ID = "physical-intelligence/libero"  # openpi's LIBERO asset id
PALIGEMMA_TOKENIZER_URL = "gs://big_vision/paligemma_tokenizer.model"
VARIANTS: tuple[str, ...] = ("pi05", "tiny")
# Files of a bundle worth downloading (fnmatch; '*' crosses '/'): never openpi's JAX params/ or train state.
BUNDLE_PATTERNS: tuple[str, ...] = (
    "model.safetensors",
    "config.json",
    "tokenizer.model",
    "norm_stats.json",
    "assets/*norm_stats.json",
    "*normalizer_processor*.safetensors",
)
_HINT = "set policy.checkpoint to a local bundle directory (or a reachable hf:<repo_id> / gs:// URL)"
_TOKENIZER_HINT = "set policy.tokenizer to a local SentencePiece model file"
_HF_RE = re.compile(r"^hf:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_GS_RE = re.compile(r"^gs://(?P<bucket>[a-z0-9][a-z0-9._-]*)(?:/(?P<path>.*))?$")
_CHUNK = 1 << 20


class BundleError(SetupError, RuntimeError):
    """A bundle cannot be resolved: the message names what is missing and where it was looked for."""


@dataclass(frozen=True)
class Source:
    """A parsed bundle source."""

    kind: str  # "local" | "hf" | "gs"
    location: str  # local path, HF repo id, or GCS bucket
    revision: str | None = None  # HF revision (branch, tag, commit)
    path: str = ""  # object path inside the GCS bucket, no leading/trailing '/'


@dataclass(frozen=True)
class Bundle:
    """A resolved bundle: local paths plus the parsed config and norm stats."""

    source: str  # as given
    root: Path  # local directory of the bundle
    weights: Path  # model.safetensors
    layout: str  # "openpi" | "lerobot" (key layout of the weights)
    variant: str  # model variant for pi05eval.model.get_config
    model_overrides: Mapping[str, Any]  # get_config(variant, **model_overrides)
    norm_stats: Mapping[str, NormStats]  # "actions" always, "state" when the bundle has it
    norm_stats_path: Path
    tokenizer: Path  # SentencePiece model
    model_config: Pi05Config  # get_config(variant, **model_overrides), checked against the weights


def parse_source(source: str) -> Source:
    """``hf:<repo_id>[@rev]`` | ``gs://bucket[/path]`` | local path (``~`` expanded)."""
    source = str(source).strip()
    if source.startswith("hf:"):
        m = _HF_RE.match(source)
        if not m:
            raise BundleError(f"bad HF source {source!r}: expected hf:<owner>/<name>[@revision]")
        return Source("hf", m["repo"], m["rev"])
    if source.startswith("gs://"):
        m = _GS_RE.match(source)
        if not m:
            raise BundleError(f"bad GCS source {source!r}: expected gs://<bucket>/<path>")
        return Source("gs", m["bucket"], path=(m["path"] or "").strip("/"))
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        raise BundleError(f"unsupported source {source!r}: use a local directory, hf:<repo_id>[@rev] or gs://...")
    return Source("local", str(Path(source).expanduser()))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The download cache: the argument, else $PI05EVAL_CACHE, else ~/.cache/pi05eval (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "pi05eval"


# ----------------------------------------------------------------------------------------------- downloads
def _gcs_base(base_url: str | None) -> str:
    return (base_url or os.environ.get(GCS_URL_ENV) or GCS_BASE_URL).rstrip("/")


def gcs_list(bucket: str, prefix: str, base_url: str | None = None) -> list[dict[str, Any]]:
    """All objects under `prefix` (JSON API, paginated): dicts with at least ``name`` and ``size``."""
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        query = {"prefix": prefix, "fields": "items(name,size,md5Hash),nextPageToken"}
        if token:
            query["pageToken"] = token
        url = f"{_gcs_base(base_url)}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=60) as resp:
            page = json.load(resp)
        items.extend(page.get("items", []))
        token = page.get("nextPageToken")
        if not token:
            return items


def gcs_download(bucket: str, obj: Mapping[str, Any], dest: Path, base_url: str | None = None) -> Path:
    """Download one listed object to `dest` (atomic rename; size and md5 checked; skipped when already there)."""
    size = int(obj.get("size", -1))
    if dest.is_file() and (size < 0 or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = f"{_gcs_base(base_url)}/{bucket}/{urllib.parse.quote(obj['name'])}"
    md5 = hashlib.md5()
    logger.info("downloading %s (%.1f MB) -> %s", url, size / 1e6, dest)
    with urllib.request.urlopen(url, timeout=60) as resp, part.open("wb") as f:
        while chunk := resp.read(_CHUNK):
            f.write(chunk)
            md5.update(chunk)
    got = part.stat().st_size
    if size >= 0 and got != size:
        part.unlink()
        raise BundleError(f"download of {url} is incomplete: {got} of {size} bytes")
    if obj.get("md5Hash") and base64.b64encode(md5.digest()).decode() != obj["md5Hash"]:
        part.unlink()
        raise BundleError(f"download of {url} is corrupt: md5 mismatch")
    part.replace(dest)
    return dest


def fetch_gcs(url: str, cache_dir: str | Path | None = None, base_url: str | None = None, hint: str = _HINT) -> Path:
    """Download a gs:// object, or the bundle files (`BUNDLE_PATTERNS`) under a gs:// prefix, into the cache.

    Returns the local file (object) or directory (prefix): ``<cache>/gs/<bucket>/<path>``. When the listing fails
    (offline) an earlier complete download is used; `hint` ends the error otherwise.
    """
    src = parse_source(url)
    if src.kind != "gs":
        raise BundleError(f"not a gs:// URL: {url!r}")
    local = cache_root(cache_dir) / "gs" / src.location / src.path
    try:
        objects = gcs_list(src.location, src.path, base_url)
    except OSError as e:  # URLError, HTTPError, socket errors
        if local.is_file() or (local / "model.safetensors").is_file():
            logger.warning("cannot list %s (%s): using the cached copy %s", url, e, local)
            return local
        raise BundleError(f"cannot download {url} ({e}); offline? {hint}") from e
    try:
        exact = [o for o in objects if o["name"] == src.path]
        if exact:
            return gcs_download(src.location, exact[0], local, base_url)
        prefix = f"{src.path}/" if src.path else ""
        wanted = []
        for obj in objects:
            rel = obj["name"][len(prefix) :]
            if obj["name"].startswith(prefix) and any(fnmatch.fnmatch(rel, p) for p in BUNDLE_PATTERNS):
                wanted.append((rel, obj))
        if not wanted:
            found = sorted(o["name"] for o in objects)[:20]
            raise BundleError(f"{url}: no bundle files ({', '.join(BUNDLE_PATTERNS)}) there; found {found}")
        for rel, obj in wanted:
            gcs_download(src.location, obj, local / rel, base_url)
    except OSError as e:  # URLError, HTTPError, socket errors
        raise BundleError(f"cannot download {url} ({e}); offline? {hint}") from e
    if not (local / "model.safetensors").is_file() and any("/params/" in f"/{o['name']}" for o in objects):
        raise BundleError(
            f"{url} is an openpi JAX checkpoint (params/ but no model.safetensors): convert it with openpi's "
            "examples/convert_jax_model_to_pytorch.py and point policy.checkpoint at the converted directory"
        )
    return local


def fetch_hf(repo_id: str, revision: str | None, cache_dir: str | Path | None = None) -> Path:
    """Snapshot the bundle files of a Hugging Face repo into ``<cache>/hf`` (uses the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        hf_cache = str(cache_root(cache_dir) / "hf")
        path = snapshot_download(repo_id, revision=revision, cache_dir=hf_cache, allow_patterns=list(BUNDLE_PATTERNS))
    except Exception as e:  # huggingface_hub raises many types (offline, gated, missing repo)
        raise BundleError(f"cannot download hf:{repo_id} ({type(e).__name__}: {e}); offline? {_HINT}") from e
    return Path(path)


# ----------------------------------------------------------------------------------------------- local parts
def _weights_layout(weights: Path) -> str:
    """The key layout (openpi or lerobot), from the safetensors header only."""
    from safetensors import safe_open

    from pi05eval.model.weights import detect_layout

    with safe_open(str(weights), framework="pt") as f:
        return detect_layout(list(f.keys()))


def read_model_config(root: Path) -> tuple[str, dict[str, Any]]:
    """(variant, overrides) from ``config.json``; ``("pi05", {})`` when absent."""
    path = root / "config.json"
    if not path.is_file():
        return "pi05", {}
    cfg = json.loads(path.read_text())
    if "variant" in cfg:
        variant = cfg["variant"]
        if variant not in VARIANTS:
            raise BundleError(f"{path}: unknown variant {variant!r}; choices: {', '.join(VARIANTS)}")
        return variant, {k: v for k, v in cfg.items() if k != "variant"}
    if "paligemma_variant" in cfg:  # openpi's convert_jax_model_to_pytorch.py
        if (cfg.get("paligemma_variant"), cfg.get("action_expert_variant")) != ("gemma_2b", "gemma_300m"):
            raise BundleError(f"{path}: only gemma_2b + gemma_300m (pi05) checkpoints are supported, got {cfg}")
        return "pi05", {"action_horizon": cfg["action_horizon"]} if "action_horizon" in cfg else {}
    if cfg.get("type") in ("pi05", "pi0.5"):  # lerobot PI05Config
        return "pi05", {"action_horizon": cfg["chunk_size"]} if "chunk_size" in cfg else {}
    raise BundleError(f"{path}: not a pi05eval, openpi or lerobot config (keys {sorted(cfg)[:10]})")


def _stats_from_json(path: Path) -> dict[str, NormStats]:
    data = json.loads(path.read_text())
    data = data.get("norm_stats", data)
    return {k: NormStats.from_dict(v, f"{path}:{k}") for k, v in data.items() if isinstance(v, Mapping)}


def _stats_from_lerobot(paths: list[Path]) -> dict[str, NormStats]:
    from safetensors.numpy import load_file

    flat: dict[str, Any] = {}
    for p in paths:
        flat |= load_file(str(p))
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        feature, stat = key.rsplit(".", 1)
        name = {"observation.state": "state", "action": "actions"}.get(feature)
        if name:
            grouped.setdefault(name, {})[stat] = value
    return {k: NormStats.from_dict(v, f"{paths[0].parent}:{k}") for k, v in grouped.items()}


def find_norm_stats(root: Path, asset_id: str = DEFAULT_ASSET_ID) -> tuple[Path, dict[str, NormStats]]:
    """Norm stats of a bundle; the error lists every place looked at."""
    looked = [root / "norm_stats.json", root / "assets" / asset_id / "norm_stats.json"]
    for path in looked:
        if path.is_file():
            return path, _stats_from_json(path)
    others = sorted((root / "assets").rglob("norm_stats.json")) if (root / "assets").is_dir() else []
    if len(others) == 1:
        return others[0], _stats_from_json(others[0])
    if len(others) > 1:
        raise BundleError(f"several norm stats under {root / 'assets'}: {others}; set policy.asset_id to choose one")
    looked.append(root / "assets" / "**" / "norm_stats.json")
    lerobot = sorted(root.glob("*normalizer_processor*.safetensors"))
    if lerobot:
        return lerobot[0], _stats_from_lerobot(lerobot)
    looked.append(root / "*normalizer_processor*.safetensors")
    raise BundleError("norm stats (norm_stats.json) not found; looked at: " + ", ".join(map(str, looked)))


def find_tokenizer(root: Path, tokenizer: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """The SentencePiece model: the bundle's ``tokenizer.model``, else the configured one (local path or gs:// URL,
    downloaded once), else PaliGemma's tokenizer if an earlier run cached it. The error lists every place looked at."""
    looked = [root / "tokenizer.model"]
    if looked[0].is_file():
        if tokenizer is not None:
            logger.info("bundle %s ships its own tokenizer.model; policy.tokenizer=%s not used", root, tokenizer)
        return looked[0]
    if tokenizer is not None and str(tokenizer).startswith("gs://"):
        return fetch_gcs(str(tokenizer), cache_dir, hint=_TOKENIZER_HINT)
    fallback = fetch_target(PALIGEMMA_TOKENIZER_URL, cache_dir)
    looked.append(Path(tokenizer).expanduser() if tokenizer is not None else fallback)
    if looked[1].is_file():
        return looked[1]
    raise BundleError(
        "tokenizer.model not found; looked at: "
        + ", ".join(map(str, looked))
        + f". openpi checkpoints ship none: set policy.tokenizer to a SentencePiece model file or to "
        f"{PALIGEMMA_TOKENIZER_URL} (downloaded once into the cache)"
    )


def fetch_target(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where `fetch_gcs` puts a gs:// URL (nothing is downloaded)."""
    src = parse_source(url)
    return cache_root(cache_dir) / "gs" / src.location / src.path


# ----------------------------------------------------------------------------------------------- entry point
def resolve_bundle(
    source: str | Path,
    cache_dir: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    asset_id: str = DEFAULT_ASSET_ID,
    check_weights: bool = True,
) -> Bundle:
    """Resolve (download if remote) and check a bundle: weights, config, norm stats, tokenizer.

    With `check_weights`, the checkpoint's keys and shapes are checked against the model config
    (`pi05eval.model.weights.check_checkpoint`) so a bad file fails here, before any simulation.
    """
    src = parse_source(str(source))
    if src.kind == "hf":
        root = fetch_hf(src.location, src.revision, cache_dir)
    elif src.kind == "gs":
        root = fetch_gcs(str(source), cache_dir)
    else:
        root = Path(src.location)
        if not root.is_dir():
            raise BundleError(f"policy bundle directory not found: {root}; {_HINT}")
    weights = root / "model.safetensors"
    if not weights.is_file():
        hint = " (an openpi JAX checkpoint: convert it to PyTorch first)" if (root / "params").is_dir() else ""
        found = sorted(p.name for p in root.iterdir())[:20]
        raise BundleError(f"weights not found: {weights}{hint}; the directory holds {found}")
    layout = _weights_layout(weights)
    variant, overrides = read_model_config(root)
    stats_path, stats = find_norm_stats(root, asset_id)
    if "actions" not in stats:
        raise BundleError(f"{stats_path}: no 'actions' statistics (has {sorted(stats)})")
    tok = find_tokenizer(root, tokenizer, cache_dir)
    model_config = _model_config(variant, overrides, weights, check_weights)
    logger.info("bundle %s: %s weights (%s), norm stats %s, tokenizer %s", source, variant, layout, stats_path, tok)
    return Bundle(str(source), root, weights, layout, variant, overrides, stats, stats_path, tok, model_config)


def _model_config(variant: str, overrides: Mapping[str, Any], weights: Path, check_weights: bool) -> Pi05Config:
    from pi05eval.model import get_config
    from pi05eval.model.weights import CheckpointError, check_checkpoint

    try:
        cfg = get_config(variant, **overrides)
    except (TypeError, ValueError) as e:
        raise BundleError(f"bad model config for {weights.parent}: {e}") from e
    if check_weights:
        try:
            check_checkpoint(weights, cfg)
        except CheckpointError as e:
            raise BundleError(f"{weights} does not match the {variant} model: {e}") from e
    return cfg
