"""Load causal LMs and tokenizers the way every step does: real ``from_pretrained``.

A model reference (``model.base_model``) is one of:

* a local folder;
* an ``s3://`` prefix (copied to a local cache, checked against its MANIFEST.json when it
  has one);
* a Hugging Face hub id (``org/name``, with ``model.revision``), resolved through the
  local Hugging Face cache.  Nothing is downloaded unless the admin's base config allows
  it (``model.hub_downloads``); when it is not cached (or cannot be fetched), the step
  exits 2 naming the id and the cache folder.  Which hub ids a run may name, and that its
  revision is a pinned commit, is the trigger form's rule (``model.hub_repos``).

Weights from safetensors only (``use_safetensors=True``): a pickle checkpoint is refused.
``trust_remote_code`` stays False unless the config sets ``model.trust_remote_code``.
Precision (``compute.dtype``) and attention (``compute.attn_implementation``) come from
the config; trainable weights are kept in fp32 (see :func:`load_causal_lm`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import MANIFEST, Storage, is_remote, join, sha256_file

log = logging.getLogger(__name__)


def unwrap_peft(model):
    """The model under a PEFT wrapper (``get_base_model()``), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                "*.jinja"]


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _resolve_hub(repo_id: str, revision: str | None, download: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = (f"model '{repo_id}'" + (f" at revision '{revision}'" if revision else "")
             + " is no local folder, and")
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not download:
        raise BadInput(f"{where} is not in the Hugging Face cache {hub_cache_dir()}, and the "
                       "base config allows no downloads (model.hub_downloads); fill the cache "
                       f"first (`hf download {repo_id}`) or use a local or s3:// folder",
                       field="model.base_model")
    if not offline:
        try:
            return Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # no network, unknown repo, gated repo ...
            raise BadInput(f"{where} is not in the Hugging Face cache {hub_cache_dir()} and "
                           f"could not be downloaded ({type(exc).__name__}); run `hf download "
                           f"{repo_id}` where the hub is reachable, or use a local or s3:// "
                           "folder", field="model.base_model") from None
    raise BadInput(f"{where} is not in the Hugging Face cache {hub_cache_dir()} "
                   "(HF_HUB_OFFLINE is set); fill the cache first or use a local or s3:// "
                   "folder", field="model.base_model")


def local_model_dir(uri: str, storage: Storage | None = None,
                    cache_dir: str | Path = ".rlhf/cache/models",
                    revision: str | None = None, download: bool = False) -> Path:
    """A local folder holding the checkpoint at ``uri`` (downloaded once from S3, or found
    in the Hugging Face cache for a hub id; fetched from the hub only with ``download``)."""
    if is_remote(uri):
        if storage is None:
            raise BadInput("a model in an object store needs the storage settings", file=uri)
        target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if (target / ".complete").exists():
            return target
        verify = storage.exists(join(uri, MANIFEST))
        storage.get_dir(uri, target, verify=verify)
        (target / ".complete").write_text(uri)
        return target
    path = Path(uri).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.match(uri) and not uri.startswith((".", "~")):
        return _resolve_hub(uri, revision, download)
    raise BadInput("model folder not found (expected a Hugging Face checkpoint folder with "
                   "config.json and *.safetensors, an s3:// folder or a hub id)", file=uri,
                   field="model.base_model")


def base_model_dir(cfg, storage: Storage | None = None) -> Path:
    """The run's foundation model as a local folder.  With ``storage``, a local folder or
    S3 prefix must lie inside its roots, checked again here after normalising (``..`` and
    links resolved): the config could have been written by someone other than the form."""
    uri = cfg.model.base_model
    if storage is not None and (is_remote(uri) or Path(uri).expanduser().exists()):
        storage.check_read(uri)
    return local_model_dir(cfg.model.base_model, storage, revision=cfg.model.revision,
                           download=cfg.model.hub_downloads)


def require_safetensors(path: Path) -> None:
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: convert to safetensors)" if pickles else ""
        raise BadInput(f"no *.safetensors weights in the model folder{hint}", file=str(path),
                       field="model.base_model")


@lru_cache(maxsize=8)
def _weights_digest(folder: str) -> str:
    """sha256 over ``name:sha256`` of every safetensors file, sorted by name.

    Each file is hashed, except a link into the Hugging Face cache's blobs, which the hub
    names by their sha256 (huggingface_hub checks them when it downloads).  A MANIFEST.json
    in the folder, or a link elsewhere, is not taken at its word: whoever wrote the folder
    could have written either."""
    root = Path(folder)
    blobs = Path(os.path.realpath(hub_cache_dir()))
    lines = []
    for path in sorted(root.glob("*.safetensors")):
        target = Path(os.path.realpath(path))
        known = None
        if (path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name)
                and target.parent.name == "blobs" and blobs in target.parents):
            known = target.name
        lines.append(f"{path.name}:{known or sha256_file(path)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def describe(cfg, storage: Storage | None = None) -> dict[str, str]:
    """What the base model reference resolved to: for MLflow (``model.*`` params)."""
    folder = base_model_dir(cfg, storage)
    revision = cfg.model.revision or ""
    if "snapshots" in folder.parts:  # hub cache: the folder is named by the commit
        revision = folder.name
    return {"model.resolved_path": str(folder), "model.resolved_revision": revision or "n/a",
            "model.weights_sha256": _weights_digest(str(folder))}


def load_tokenizer_from(uri: str, trust_remote_code: bool = False,
                        storage: Storage | None = None, revision: str | None = None,
                        download: bool = False):
    """The tokenizer; without a pad token it pads with EOS (no new token: the vocabulary
    and the embeddings stay as they are; masks, not token ids, mark the padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        local_model_dir(uri, storage, revision=revision, download=download),
        trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg, storage: Storage | None = None):
    """The configured tokenizer (``model.tokenizer``, else the base model's)."""
    revision = None if cfg.model.tokenizer else cfg.model.revision
    return load_tokenizer_from(cfg.model.tokenizer or cfg.model.base_model,
                               cfg.model.trust_remote_code, storage, revision,
                               download=cfg.model.hub_downloads)


def renderer(cfg, tokenizer, storage: Storage | None = None):
    """The run's :class:`~rlhf_tasks.prompting.PromptRenderer` (stop ids from the base model)."""
    from rlhf_tasks.prompting import PromptRenderer

    return PromptRenderer.from_config(cfg, tokenizer, base_model_dir(cfg, storage))


# -- precision -------------------------------------------------------------------------------
def cpu_has_amx_bf16(cpuinfo: str | None = None) -> bool:
    """A CPU with AMX bf16 tiles (Sapphire Rapids and later: a bf16 matmul several times
    faster than fp32; AVX512-bf16 alone is not), from the kernel's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return any(line.startswith("flags") and "amx_bf16" in line.split()
               for line in cpuinfo.splitlines())


_REPORTED: set[tuple[str, str]] = set()


def compute_dtype(cfg, device: str):
    """The torch dtype of frozen weights and of autocast: ``compute.dtype``; ``auto`` is bf16
    on a GPU that supports it and on a CPU with AMX bf16 tiles, fp32 otherwise (logged once
    per process, with the reason)."""
    import torch

    name = cfg.compute.dtype
    if name == "auto":
        if device == "cuda":
            name, why = (("bf16", "a GPU with bf16") if torch.cuda.is_bf16_supported()
                         else ("fp32", "a GPU without bf16"))
        else:
            name, why = (("bf16", "a CPU with AMX bf16 tiles") if cpu_has_amx_bf16()
                         else ("fp32", "a CPU without AMX bf16"))
        if (device, name) not in _REPORTED:
            _REPORTED.add((device, name))
            log.info("compute.dtype auto: %s on %s", name, why)
    if name == "fp16" and device == "cpu":
        raise BadInput("compute.dtype fp16 needs a GPU; use bf16 or fp32 on the CPU",
                       field="compute.dtype")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (and fp16, fp32): the config's spelling."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def attn_implementation(cfg, device: str) -> str:
    """``compute.attn_implementation``; ``auto``: flash-attention 2 on a GPU where the
    package is installed, sdpa otherwise."""
    import importlib.util

    name = cfg.compute.attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if device == "cuda" and has_flash else "sdpa"
    if name == "flash_attention_2" and (device != "cuda" or not has_flash):
        raise BadInput("compute.attn_implementation flash_attention_2 needs a GPU and the "
                       "flash-attn package; use sdpa", field="compute.attn_implementation")
    return name


def load_kwargs(cfg, device: str, trainable: bool) -> dict:
    """``from_pretrained`` settings: frozen weights in the compute dtype; weights that are
    tuned in full keep fp32 master copies (autocast runs the forward in the compute dtype),
    since a bf16 Adam update at lr 1e-6 rounds away."""
    import torch

    dtype = compute_dtype(cfg, device)
    return {"dtype": torch.float32 if trainable else dtype,
            "attn_implementation": attn_implementation(cfg, device)}


def upcast_trainable(model) -> int:
    """fp32 master copies of every trainable parameter (LoRA, heads); returns their count."""
    import torch

    count = 0
    for param in model.parameters():
        if param.requires_grad:
            if param.dtype != torch.float32:
                param.data = param.data.float()
            count += param.numel()
    return count


def load_causal_lm(cfg, storage: Storage | None = None, path: str | None = None, **kwargs):
    """The base model (or ``path``) as an ``AutoModelForCausalLM``, from safetensors."""
    from transformers import AutoModelForCausalLM

    folder = local_model_dir(path, storage) if path else base_model_dir(cfg, storage)
    require_safetensors(folder)
    return AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True, **kwargs)
