"""Share agents on the Hugging Face Hub in this format: no pickle, so no ``TRUST_REMOTE_CODE``.

* ``package_for_hub(model, folder)`` writes a repo folder: the agent file, a model card (``README.md``) generated
  from the file's manifest, and a ``config.json`` for the Hub's widgets;
* ``push_to_hub(model, repo_id)`` packages into a temporary folder and uploads it with ``HfApi.upload_folder``;
* ``load_from_hub(repo_id, filename)`` downloads with ``hf_hub_download`` (so the Hub cache, offline mode and
  tokens work as usual) and loads with every check of ``load``; ``expected_sha256=`` pins the file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sb3_safe_save._errors import FormatError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_safe_save._manifest import Manifest

SUFFIX = ".safetensors"
LIBRARY_NAME = "stable-baselines3"
BASE_TAGS = ("deep-reinforcement-learning", "reinforcement-learning", "stable-baselines3", "sb3-safe-save", "safetensors")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".zip", ".pt", ".pth", ".bin", ".joblib", ".npy", ".npz"})
_NOT_HYPERPARAMETERS = frozenset({"verbose", "seed", "start_time", "tensorboard_log", "num_timesteps"})


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError('sharing on the Hugging Face Hub needs huggingface_hub: pip install "sb3-safe-save[hub]"') from e
    return huggingface_hub


def _env_id_of(model: Any) -> str | None:
    env = model.get_env()
    if env is None:
        return None
    try:
        spec = env.get_attr("spec", [0])[0]
    except (AttributeError, IndexError):
        return None
    return getattr(spec, "id", None)


def package_for_hub(
    model: BaseAlgorithm | str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    env_id: str | None = None,
    filename: str | None = None,
    vec_normalize: VecNormalize | None = None,
    tags: Iterable[str] = (),
    save_kwargs: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    extra_files: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Write a Hub repo folder: the agent file, ``README.md`` (a model card from the manifest) and ``config.json``.

    :param model: a model with safe ``save`` (``safe(PPO)``, ``SafeSaveMixin``), or the path of a file it saved
    :param folder: the folder to write (created if needed; files of the same names are replaced)
    :param env_id: the environment's id (default: the model's env spec id)
    :param filename: the agent's file name (default: ``{algo}-{env_id}.safetensors``, as huggingface_sb3 names it)
    :param vec_normalize: a ``VecNormalize`` whose statistics go into the agent file (``save(..., vec_normalize=)``)
    :param tags: extra model card tags
    :param save_kwargs: more keyword arguments for ``model.save`` (``resources=``, ``specs=``, ``optional=``, ...)
    :param repo_id: the repo the folder is for, shown in the card's usage snippet
    :param extra_files: more files to ship next to the agent (e.g. an rl-zoo3 run's ``vecnormalize.safetensors``
        and ``config.yml``), listed in the card with their SHA-256; pickle formats (``.pkl``, ``.zip``, ...) are refused
    :return: the folder
    """
    from sb3_safe_save._mixin import SafeSaveMixin
    from sb3_safe_save._persist import read_manifest
    from sb3_safe_save._weights import file_sha256

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    saver: SafeSaveMixin | None = None
    if source is not None:
        if vec_normalize is not None or save_kwargs:
            raise ValueError("vec_normalize= and save_kwargs= apply when saving a model, not when packaging a file")
        algo_name = read_manifest(source).algorithm.rpartition(":")[2]
    elif isinstance(model, SafeSaveMixin):
        saver, algo_name = model, type(model).__name__
        env_id = env_id or _env_id_of(model)
    else:
        raise TypeError(
            f"{type(model).__name__} saves with pickle; package a model of safe({type(model).__name__}) or a"
            " SafeSaveMixin subclass, or the path of a file it saved"
        )
    if not env_id:
        raise ValueError("the environment id is unknown: pass env_id='CartPole-v1' (it names the file and tags the card)")
    name = filename or f"{algo_name.lower()}-{env_id.replace('/', '-')}{SUFFIX}"
    if Path(name).name != name or not name.endswith(SUFFIX):
        raise ValueError(f"filename {name!r} must be a plain file name ending in {SUFFIX}")
    target = out / name
    if saver is not None:
        saver.save(target, vec_normalize=vec_normalize, **dict(save_kwargs or {}))
    elif source is not None:
        shutil.copyfile(source, target)
    extras = _copy_extra_files(extra_files, out, reserved={name, "README.md", "config.json"})
    manifest = read_manifest(target)
    sha256 = file_sha256(target)
    size = target.stat().st_size
    card_tags = [env_id, *BASE_TAGS, *(t for t in tags if t not in BASE_TAGS)]
    (out / "README.md").write_text(
        model_card(manifest, env_id, name, sha256, size, card_tags, repo_id, extras), encoding="utf-8"
    )
    config = hub_config(manifest, env_id, name, sha256, size) | {"extra_files": extras}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _copy_extra_files(files: Iterable[str | os.PathLike[str]], out: Path, reserved: set[str]) -> dict[str, str]:
    """Copy ``files`` into ``out``; return name -> SHA-256."""
    from sb3_safe_save._weights import file_sha256

    extras: dict[str, str] = {}
    for item in files:
        src = Path(item)
        if src.suffix.lower() in _PICKLE_SUFFIXES:
            raise ValueError(
                f"{src}: {src.suffix} files are (or hold) pickles, which whoever downloads them would have to trust;"
                " ship the safetensors files sb3_safe_save writes instead (vecnormalize.safetensors, ...)"
            )
        if src.name in reserved or src.name in extras:
            raise ValueError(f"{src}: the repo folder already has a file named {src.name!r}")
        shutil.copyfile(src, out / src.name)
        extras[src.name] = file_sha256(out / src.name)
    return extras


def _parameters(manifest: Manifest) -> tuple[int, int]:
    """(count, bytes) of the policy's stored tensors."""
    count = nbytes = 0
    for key, meta in manifest.tensors.items():
        if key.startswith("policy/"):
            n = math.prod(meta.shape)
            count += n
            nbytes += n * _DTYPE_BYTES.get(meta.dtype, 0)
    return count, nbytes


def _short_type(ref: str) -> str:
    return ref.replace(":", ".")


def hub_config(manifest: Manifest, env_id: str, filename: str, sha256: str, size: int) -> dict[str, Any]:
    """The ``config.json`` of a Hub repo: what the widgets and scripts read, all from the manifest."""
    params, params_bytes = _parameters(manifest)
    hyper = {
        k: v
        for k, v in manifest.data.items()
        if not k.startswith("_") and k not in _NOT_HYPERPARAMETERS and (v is None or isinstance(v, (bool, int, float, str)))
    }
    return {
        "library_name": LIBRARY_NAME,
        "format": manifest.format,
        "format_version": manifest.format_version,
        "filename": filename,
        "sha256": sha256,
        "size_bytes": size,
        "env_id": env_id,
        "algorithm": _short_type(manifest.algorithm),
        "base_algorithm": _short_type(manifest.base_algorithm),
        "policy_parameters": params,
        "policy_bytes": params_bytes,
        "vec_normalize": manifest.vec_normalize is not None,
        "versions": manifest.versions.model_dump(),
        "hyperparameters": hyper,
        "placeholders": [
            {"key": p.key, "type": p.type, "paths": p.paths, "reason": p.reason, "hint": p.hint, "optional": p.optional}
            for p in manifest.placeholders
        ],
    }


def _yaml_list(name: str, items: Iterable[str]) -> str:
    return f"{name}:\n" + "".join(f"- {json.dumps(i)}\n" for i in items)


def model_card(
    manifest: Manifest,
    env_id: str,
    filename: str,
    sha256: str,
    size: int,
    tags: list[str],
    repo_id: str | None = None,
    extras: Mapping[str, str] | None = None,
) -> str:
    """A model card (``README.md`` with Hub metadata) generated from the manifest."""
    algo = manifest.algorithm.rpartition(":")[2]
    params, params_bytes = _parameters(manifest)
    v = manifest.versions
    versions = f"sb3_safe_save {v.sb3_safe_save}, stable-baselines3 {v.stable_baselines3}, torch {v.torch}"
    versions += "".join(f", {n} {x}" for n, x in (("sb3-contrib", v.sb3_contrib), ("gymnasium", v.gymnasium)) if x)
    versions += f", numpy {v.numpy}, Python {v.python}"
    lines = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        _yaml_list("tags", tags).rstrip("\n"),
        "---",
        "",
        f"# {algo} agent for {env_id}",
        "",
        f"A [stable-baselines3](https://github.com/DLR-RM/stable-baselines3) {algo} agent for **{env_id}**, saved with"
        " [sb3_safe_save](https://pypi.org/project/sb3-safe-save/): one safetensors file with a JSON manifest."
        " Loading it unpickles nothing and imports only trusted classes, so it needs no `TRUST_REMOTE_CODE`.",
        "",
        "| | |",
        "|---|---|",
        f"| algorithm | `{_short_type(manifest.algorithm)}` |",
        f"| environment | `{env_id}` |",
        f"| file | `{filename}`, {size:,} bytes |",
        f"| SHA-256 | `{sha256}` |",
        f"| policy | {params:,} parameters, {params_bytes:,} bytes |",
        f"| VecNormalize statistics | {'in the file' if manifest.vec_normalize is not None else 'none'} |",
        f"| format | sb3_safe_save format {manifest.format_version} |",
        f"| saved with | {versions} |",
        "",
        "## Live resources this agent needs at load",
        "",
    ]
    if not manifest.placeholders:
        lines.append("None: the file is self-contained.")
    else:
        lines += ["| key | type | at | why left out | hint | optional |", "|---|---|---|---|---|---|"]
        for p in manifest.placeholders:
            hint = ", ".join(f"{k}={val!r}" for k, val in p.hint.items()) or "-"
            at = ", ".join(f"`{x}`" for x in p.paths[:3]) + (" ..." if len(p.paths) > 3 else "")
            lines.append(f"| `{p.key}` | `{p.type}` | {at} | {p.reason} | {hint} | {'yes' if p.optional else 'no'} |")
        lines.append("")
        for p in manifest.placeholders:
            rebuilt = " (or rebuilt by its trusted spec factory)" if p.spec is not None and p.spec.factory else ""
            need = "may use" if p.optional else "needs"
            lines.append(f"- this agent {need} a live `{p.key}` at load{rebuilt}: `resources={{{p.key!r}: obj}}`")
    if extras:
        lines += ["", "## Other files", "", "| file | SHA-256 |", "|---|---|"]
        lines += [f"| `{n}` | `{h}` |" for n, h in extras.items()]
    resources = "" if not manifest.placeholders else ", resources={...}"
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from sb3_safe_save import load_from_hub",
        "",
        f'model = load_from_hub("{repo_id or "<repo_id>"}", "{filename}", revision="<commit>",',
        f'                      expected_sha256="{sha256}"{resources})',
        "```",
        "",
        "Pin `revision` to a commit and `expected_sha256` to the hash above: then what you load is exactly this file.",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    model: BaseAlgorithm | str | os.PathLike[str],
    repo_id: str,
    *,
    env_id: str | None = None,
    filename: str | None = None,
    vec_normalize: VecNormalize | None = None,
    tags: Iterable[str] = (),
    save_kwargs: Mapping[str, Any] | None = None,
    extra_files: Iterable[str | os.PathLike[str]] = (),
    commit_message: str = "Upload agent (sb3_safe_save format)",
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_repo: bool = True,
) -> CommitInfo:
    """Package the agent (see ``package_for_hub``) and upload the folder to the Hub with ``HfApi.upload_folder``.

    :param model: a model with safe ``save``, or the path of a file it saved
    :param repo_id: ``"user/name"`` or ``"org/name"``
    :param env_id: the environment's id (default: the model's env spec id)
    :param filename: the agent's file name in the repo
    :param vec_normalize: a ``VecNormalize`` whose statistics go into the agent file
    :param tags: extra model card tags
    :param save_kwargs: more keyword arguments for ``model.save``
    :param extra_files: more files to ship next to the agent (no pickle formats)
    :param commit_message: the commit message
    :param token: a Hub token (default: the logged-in one)
    :param private: create the repo private (only when it is created)
    :param revision: the branch to commit to
    :param create_repo: create the repo first if it does not exist
    :return: huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.oid``: the revision to pin)
    """
    hub = _import_hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="sb3_safe_save-hub-") as tmp:
        folder = package_for_hub(
            model, tmp, env_id=env_id, filename=filename, vec_normalize=vec_normalize, tags=tags,
            save_kwargs=save_kwargs, repo_id=repo_id, extra_files=extra_files,
        )  # fmt: skip
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True)
        info: CommitInfo = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )
        return info


def load_from_hub(
    repo_id: str,
    filename: str,
    algo: type[BaseAlgorithm] | None = None,
    *,
    revision: str | None = None,
    expected_sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
    **load_kwargs: Any,
) -> Any:
    """Download an agent with ``hf_hub_download`` and load it with every check of ``load``.

    Nothing is unpickled, so there is no ``TRUST_REMOTE_CODE`` switch: a stock SB3 ``.zip`` (huggingface_sb3's
    repos) is read by the restricted reader of stock files (``load(..., stock=True)``), which runs none of its
    pickles and imports only what the trust rules allow. Classes beyond the default trust list
    need ``trusted=`` as for any load. Pin ``revision`` to a commit and ``expected_sha256`` to the hash on the
    model card to load exactly the file you reviewed.

    :param repo_id: ``"org/name"``
    :param filename: the agent file in the repo, e.g. ``"ppo-CartPole-v1.safetensors"`` or a stock ``"ppo-CartPole-v1.zip"``
    :param algo: the class to load with (made safe with ``safe()``); default: the file's SB3/sb3-contrib base
        algorithm
    :param revision: a commit hash, branch or tag (default: the main branch)
    :param expected_sha256: refuse the file unless its SHA-256 matches (``IntegrityError``)
    :param cache_dir: huggingface_hub's cache folder (default: ``HF_HUB_CACHE``)
    :param token: a Hub token for private repos
    :param load_kwargs: ``env``, ``device``, ``resources``, ``trusted``, ``custom_objects``, ... for ``load``
    :return: the loaded model
    """
    from sb3_safe_save._mixin import safe
    from sb3_safe_save._persist import read_manifest
    from sb3_safe_save._trust import TrustList
    from sb3_safe_save._version import __version__

    stock = filename.endswith(".zip")  # a stock SB3 repo: read by the restricted reader, nothing in it is run
    if not (filename.endswith(SUFFIX) or stock):
        raise FormatError(f"{filename}: load_from_hub loads sb3_safe_save files ({SUFFIX}) and stock SB3 .zip files")
    hub = _import_hub()
    path = hub.hf_hub_download(
        repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir, token=token,
        library_name="sb3-safe-save", library_version=__version__,
    )  # fmt: skip
    if stock:
        from sb3_safe_save._stock import guess_algorithm, read_stock

        if algo is None:
            algo = guess_algorithm(read_stock(path, trusted=load_kwargs.get("trusted")).data)
            if algo is None:
                raise FormatError(f"{repo_id}/{filename}: cannot tell which algorithm wrote it; pass algo=...")
        return safe(algo).load(path, expected_sha256=expected_sha256, stock=True, **load_kwargs)
    if algo is None:
        base = read_manifest(path).base_algorithm
        if TrustList(None).why(base, "algorithm") != "default":
            raise FormatError(
                f"{repo_id}/{filename}: its base algorithm {base} is not a stable_baselines3/sb3_contrib class;"
                " pass the class to load it with: load_from_hub(..., algo=MyAlgo)"
            )
        algo = TrustList(None).resolve(base, "base_algorithm", "algorithm")
    return safe(algo).load(path, expected_sha256=expected_sha256, **load_kwargs)
