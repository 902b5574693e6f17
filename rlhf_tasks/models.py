"""Load causal LMs and tokenizers the way every step does: real ``from_pretrained``.

* A local folder or an ``s3://`` prefix (copied to a local cache, checked against its
  MANIFEST.json when it has one).  A Hugging Face hub id is used only when the user names
  one: nothing here downloads unless asked.
* Weights from safetensors only (``use_safetensors=True``): a pickle checkpoint is refused.
* ``trust_remote_code`` stays False unless the config sets ``model.trust_remote_code``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import MANIFEST, Storage, is_s3, join


def local_model_dir(uri: str, storage: Storage | None = None,
                    cache_dir: str | Path = ".rlhf/cache/models") -> Path:
    """A local folder holding the checkpoint at ``uri`` (downloaded once from S3)."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise BadInput("model folder not found (expected a Hugging Face checkpoint "
                           "folder with config.json and *.safetensors)", file=uri,
                           field="model.base_model")
        return path
    if storage is None:
        raise BadInput("an s3:// model needs the storage settings", file=uri)
    target = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return target
    verify = storage.exists(join(uri, MANIFEST))
    storage.get_dir(uri, target, verify=verify)
    (target / ".complete").write_text(uri)
    return target


def require_safetensors(path: Path) -> None:
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: convert to safetensors)" if pickles else ""
        raise BadInput(f"no *.safetensors weights in the model folder{hint}", file=str(path),
                       field="model.base_model")


def load_tokenizer_from(uri: str, trust_remote_code: bool = False,
                        storage: Storage | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(uri, storage),
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg, storage: Storage | None = None):
    """The configured tokenizer (``model.tokenizer``, else the base model's)."""
    return load_tokenizer_from(cfg.model.tokenizer or cfg.model.base_model,
                               cfg.model.trust_remote_code, storage)


def load_causal_lm(cfg, storage: Storage | None = None, path: str | None = None, **kwargs):
    """The base model (or ``path``) as an ``AutoModelForCausalLM``, from safetensors."""
    from transformers import AutoModelForCausalLM

    folder = local_model_dir(path or cfg.model.base_model, storage)
    require_safetensors(folder)
    return AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True, **kwargs)
