"""Share agents on the Hugging Face Hub in this format: no pickle, so no ``TRUST_REMOTE_CODE``.

* ``package_for_hub(model, folder)`` writes a repo folder: the agent file, a model card (``README.md``) generated
  from the file's manifest, and a ``config.json`` for the Hub's widgets; with ``eval_env=`` it also evaluates the
  agent (``evaluate_policy``, as huggingface_sb3's ``package_to_hub`` does), writes ``model-index`` metadata and
  ``results.json``, and records ``replay.mp4`` where the env renders and moviepy is installed;
* ``push_to_hub(model, repo_id)`` packages into a temporary folder and uploads it with ``HfApi.upload_folder``;
* ``load_from_hub(repo_id, filename)`` downloads with ``hf_hub_download`` (so the Hub cache, offline mode and
  tokens work as usual) and loads with every check of ``load``; ``expected_sha256=`` pins the file.

The card's usage snippet is what a visitor copies: it loads everything the folder ships (the VecNormalize statistics,
in the agent file or in their own file) and passes ``trusted=[...]`` with every reference the load must trust.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sb3_safe_save._errors import FormatError
from sb3_safe_save._weights import DTYPE_SIZES

if TYPE_CHECKING:
    import gymnasium as gym
    from huggingface_hub import CommitInfo
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.vec_env import VecEnv, VecNormalize

    from sb3_safe_save._manifest import Manifest

SUFFIX = ".safetensors"
LIBRARY_NAME = "stable-baselines3"
BASE_TAGS = ("deep-reinforcement-learning", "reinforcement-learning", "stable-baselines3", "sb3-safe-save", "safetensors")
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".zip", ".pt", ".pth", ".bin", ".joblib", ".npy", ".npz"})
_NOT_HYPERPARAMETERS = frozenset({"verbose", "seed", "start_time", "tensorboard_log", "num_timesteps"})
REPLAY = "replay.mp4"
RESULTS = "results.json"


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_policy`` measured, as the card's ``model-index`` and ``results.json`` report it.

    :param mean_reward: the mean episode return
    :param std_reward: its standard deviation
    :param n_eval_episodes: the number of episodes
    :param deterministic: whether the actions were deterministic
    """

    mean_reward: float
    std_reward: float
    n_eval_episodes: int
    deterministic: bool


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
    eval_env: gym.Env[Any, Any] | VecEnv | None = None,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    video_length: int = 1000,
    load_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a Hub repo folder: the agent file, ``README.md`` (a model card from the manifest) and ``config.json``.

    With ``eval_env`` the agent is evaluated as huggingface_sb3's ``package_to_hub`` does it: ``evaluate_policy``
    over ``n_eval_episodes`` episodes, the result written to ``results.json`` and to the card's ``model-index``
    metadata (``mean_reward`` as ``"mean +/- std"``), and a replay of ``video_length`` steps recorded as
    ``replay.mp4`` when the env renders ``rgb_array`` frames and moviepy is installed (the card says why otherwise).
    The agent acts on ``eval_env`` wrapped in the VecNormalize statistics the folder ships, frozen (``training`` and
    ``norm_reward`` off), as the card's snippet loads them; an ``eval_env`` that already holds a ``VecNormalize``
    is used as it is, frozen too.

    :param model: a model with safe ``save`` (``safe(PPO)``, ``SafeSaveMixin``), or the path of a file it saved
    :param folder: the folder to write (created if needed; files of the same names are replaced)
    :param env_id: the environment's id (default: the model's env spec id)
    :param filename: the agent's file name (default: ``{algo}-{env_id}.safetensors``, as huggingface_sb3 names it)
    :param vec_normalize: a ``VecNormalize`` whose statistics go into the agent file (``save(..., vec_normalize=)``);
        default: the model's own (``model.get_vec_normalize_env()``), so an agent trained normalized ships its statistics
    :param tags: extra model card tags
    :param save_kwargs: more keyword arguments for ``model.save`` (``resources=``, ``specs=``, ``optional=``, ...)
    :param repo_id: the repo the folder is for, shown in the card's usage snippet
    :param extra_files: more files to ship next to the agent (e.g. an rl-zoo3 run's ``vecnormalize.safetensors``
        and ``config.yml``), listed in the card with their SHA-256; pickle formats (``.pkl``, ``.zip``, ...) are refused
    :param eval_env: the environment to evaluate the agent on (a gymnasium env or a ``VecEnv``); default: no evaluation
    :param n_eval_episodes: the number of evaluation episodes
    :param deterministic: act deterministically while evaluating and recording
    :param video_length: the replay's length in steps (0: no replay)
    :param load_kwargs: ``load`` arguments (``trusted=``, ``resources=``, ...) to load a packaged *file* for the
        evaluation; a live model is evaluated as it is
    :return: the folder
    """
    from sb3_safe_save._errors import made_from
    from sb3_safe_save._file import read_manifest
    from sb3_safe_save._mixin import SafeSaveMixin
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
        saver, algo_name = model, made_from(type(model)).__name__  # what the file records: PPO for safe(PPO)
        env_id = env_id or _env_id_of(model)
        vec_normalize = vec_normalize if vec_normalize is not None else cast(Any, model).get_vec_normalize_env()
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
    extras = _copy_extra_files(extra_files, out, reserved={name, "README.md", "config.json", RESULTS, REPLAY})
    manifest = read_manifest(target)
    sha256 = file_sha256(target)
    size = target.stat().st_size
    stats = _statistics_file(out, name, manifest.vec_normalize is not None, extras)
    trusted = must_trust(target)
    evaluation: Evaluation | None = None
    replay: str | None = "no evaluation env was given"  # None: recorded
    if eval_env is not None:
        if n_eval_episodes < 1:
            raise ValueError(f"n_eval_episodes={n_eval_episodes}: evaluate on at least one episode")
        agent = saver if saver is not None else _load_packaged(target, manifest.base_algorithm, load_kwargs)
        venv = _frozen_eval_env(eval_env, None if stats is None else out / stats)
        evaluation = _evaluate(agent, venv, n_eval_episodes, deterministic, out / RESULTS)
        replay = _record_replay(agent, venv, video_length, deterministic, out / REPLAY)
    card_tags = [env_id, *BASE_TAGS, *(t for t in tags if t not in BASE_TAGS)]
    card = model_card(
        manifest, env_id, name, sha256, size, card_tags, repo_id, extras,
        statistics=stats, trusted=trusted, evaluation=evaluation, replay=replay, deterministic=deterministic,
    )  # fmt: skip
    (out / "README.md").write_text(card, encoding="utf-8")
    config = hub_config(manifest, env_id, name, sha256, size) | {
        "extra_files": extras,
        "vec_normalize_file": stats,
        "trusted": trusted,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _statistics_file(out: Path, name: str, in_agent_file: bool, extras: Mapping[str, str]) -> str | None:
    """The file of the folder that holds the VecNormalize statistics: the agent file, one of ``extras``, or none."""
    from sb3_safe_save._vecnormalize import META_VEC_NORMALIZE
    from sb3_safe_save._weights import read_header

    found = [name] if in_agent_file else []
    for extra in extras:
        if extra.endswith(SUFFIX):
            with open(out / extra, "rb") as f:
                if META_VEC_NORMALIZE in read_header(f, os.fstat(f.fileno()).st_size).metadata:
                    found.append(extra)
    if len(found) > 1:
        raise ValueError(
            f"VecNormalize statistics are in {' and '.join(found)}: ship one set, so that the card can say which the"
            " agent was trained with"
        )
    return found[0] if found else None


def must_trust(path: str | os.PathLike[str]) -> list[str]:
    """The references (``module:QualName``) that ``load_from_hub`` of this file must be given in ``trusted=``.

    Decided as ``load`` decides (``audit`` of the file, with the file's SB3 base algorithm): the classes beyond the
    default trust list, and the ``ResourceSpec`` factories that may rebuild a live resource (only called when trusted).
    """
    from sb3_safe_save._audit import audit

    report = audit(path)
    codes = ("untrusted_reference", "spec_factory")
    refs = {f.type for f in report.findings if f.code in codes and f.severity == "warning" and f.type}
    return sorted(refs)


def _load_packaged(path: Path, base_algorithm: str, load_kwargs: Mapping[str, Any] | None) -> Any:
    """Load the packaged file to evaluate it, with the class ``load_from_hub`` would use."""
    from sb3_safe_save._mixin import safe
    from sb3_safe_save._trust import TrustList

    algo = TrustList(None).resolve(base_algorithm, "base_algorithm", "algorithm")
    return safe(algo, module=algo.__module__).load(path, **dict(load_kwargs or {}))


def _frozen_eval_env(env: Any, statistics: Path | None) -> VecEnv:
    """``env`` as a ``VecEnv`` (each env in a ``Monitor``), in the shipped VecNormalize statistics, not updating them."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, unwrap_vec_normalize

    from sb3_safe_save._vecnormalize import load_vecnormalize

    venv = env if isinstance(env, VecEnv) else DummyVecEnv([lambda: Monitor(env)])
    if unwrap_vec_normalize(venv) is None and statistics is not None:
        venv = load_vecnormalize(statistics, venv)
    normalizer = unwrap_vec_normalize(venv)
    if normalizer is not None:
        normalizer.training = False
        normalizer.norm_reward = False
    return venv


def _evaluate(agent: Any, venv: VecEnv, n_episodes: int, deterministic: bool, results: Path) -> Evaluation:
    """``evaluate_policy`` over ``n_episodes``; writes ``results.json`` as huggingface_sb3 does."""
    from stable_baselines3.common.evaluation import evaluate_policy

    result = evaluate_policy(agent, venv, n_eval_episodes=n_episodes, deterministic=deterministic)
    mean, std = cast("tuple[float, float]", result)  # the episode lists only with return_episode_rewards=True
    evaluation = Evaluation(float(mean), float(std), n_episodes, deterministic)
    data = {
        "mean_reward": evaluation.mean_reward,
        "std_reward": evaluation.std_reward,
        "is_deterministic": deterministic,
        "n_eval_episodes": n_episodes,
        "eval_datetime": datetime.now(timezone.utc).isoformat(),
    }
    results.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return evaluation


def _record_replay(agent: Any, venv: VecEnv, steps: int, deterministic: bool, target: Path) -> str | None:
    """Record ``steps`` steps of ``agent`` in ``venv`` to ``target``; return why not, or None once written."""
    import numpy as np
    from gymnasium.error import DependencyNotInstalled

    if steps <= 0:
        return "video_length=0"
    if venv.render_mode != "rgb_array":
        return (
            f"the evaluation env's render_mode is {venv.render_mode!r}, not 'rgb_array' (make it with render_mode='rgb_array')"
        )
    try:
        clips = importlib.import_module("moviepy.video.io.ImageSequenceClip")  # untyped: Any
    except ImportError:
        return "moviepy is not installed (pip install moviepy; it brings imageio and its ffmpeg)"
    obs = venv.reset()
    states = None
    starts = np.ones((venv.num_envs,), dtype=bool)
    frames = []
    try:
        for _ in range(steps):
            frame = venv.render()
            if frame is None:
                return "the evaluation env returned no frame"
            frames.append(frame)
            action, states = agent.predict(obs, state=states, episode_start=starts, deterministic=deterministic)
            obs, _, starts, _ = venv.step(action)
    except (DependencyNotInstalled, ImportError) as e:
        return f"the evaluation env cannot render here: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    render_fps = venv.metadata.get("render_fps")
    fps = render_fps if isinstance(render_fps, int) and render_fps > 0 else 30
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    clips.ImageSequenceClip(frames, fps=fps).write_videofile(str(tmp), logger=None)
    os.replace(tmp, target)
    return None


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
            nbytes += n * DTYPE_SIZES.get(meta.dtype, 0)
    return count, nbytes


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
        "algorithm": manifest.algorithm,  # module:QualName, as every reference is written
        "base_algorithm": manifest.base_algorithm,
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
    *,
    statistics: str | None = None,
    trusted: Iterable[str] = (),
    evaluation: Evaluation | None = None,
    replay: str | None = "no evaluation env was given",
    deterministic: bool = True,
) -> str:
    """A model card (``README.md`` with Hub metadata) generated from the manifest.

    :param statistics: the file holding the VecNormalize statistics (the agent file or one of ``extras``), if any
    :param trusted: the references ``load`` must be given in ``trusted=`` (``must_trust``)
    :param evaluation: the evaluation, written as ``model-index`` metadata
    :param replay: why no replay video was recorded, or None when ``replay.mp4`` was
    :param deterministic: whether the snippet acts deterministically
    """
    extras = dict(extras or {})
    trusted = list(trusted)
    algo = manifest.algorithm.rpartition(":")[2]
    params, params_bytes = _parameters(manifest)
    v = manifest.versions
    versions = f"sb3_safe_save {v.sb3_safe_save}, stable-baselines3 {v.stable_baselines3}, torch {v.torch}"
    versions += "".join(f", {n} {x}" for n, x in (("sb3-contrib", v.sb3_contrib), ("gymnasium", v.gymnasium)) if x)
    versions += f", numpy {v.numpy}, Python {v.python}"
    where_stats = {None: "none", filename: "in the agent file"}.get(statistics, f"in `{statistics}`")
    lines = ["---", f"library_name: {LIBRARY_NAME}", _yaml_list("tags", tags).rstrip("\n")]
    if evaluation is not None:
        lines += _model_index(algo, env_id, evaluation)
    lines += [
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
        f"| algorithm | `{manifest.algorithm}` |",
        f"| environment | `{env_id}` |",
        f"| file | `{filename}`, {size:,} bytes |",
        f"| SHA-256 | `{sha256}` |",
        f"| policy | {params:,} parameters, {params_bytes:,} bytes |",
        f"| VecNormalize statistics | {where_stats} |",
        f"| format | sb3_safe_save format {manifest.format_version} |",
        f"| saved with | {versions} |",
    ]
    if evaluation is not None:
        how = "deterministic" if evaluation.deterministic else "stochastic"
        lines.append(
            f"| mean reward | {evaluation.mean_reward:.2f} +/- {evaluation.std_reward:.2f} over"
            f" {evaluation.n_eval_episodes} episodes ({how} actions, `evaluate_policy`) |"
        )
    else:
        lines.append("| mean reward | not evaluated (package with `eval_env=` to evaluate) |")
    lines.append(f"| replay | `{REPLAY}` |" if replay is None else f"| replay | none: {replay} |")
    lines += ["", "## Classes the load must trust", ""]
    if not trusted:
        lines.append("None beyond the default trust list (stable-baselines3 and sb3-contrib's own classes).")
    else:
        modules = sorted({ref.partition(":")[0] for ref in trusted})
        lines += [
            "Loading imports these, so `load` needs them in `trusted=` (the snippet below passes them); the modules"
            f" ({', '.join(f'`{m}`' for m in modules)}) must be importable:",
            "",
            *(f"- `{ref}`" for ref in trusted),
        ]
        if any(p.spec is not None and p.spec.factory in trusted for p in manifest.placeholders):
            lines += [
                "",
                "A trusted resource factory is called by `load` to rebuild its live resource; to supply your own object"
                " instead, leave the factory out of `trusted=` and pass it in `resources=`.",
            ]
    lines += ["", "## Live resources this agent needs at load", ""]
    if not manifest.placeholders:
        lines.append("None: nothing was left out of the file.")
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
    lines += [
        "",
        "## Usage",
        "",
        *usage_snippet(
            manifest, env_id, filename, sha256, repo_id, statistics, extras.get(statistics or ""), trusted, deterministic
        ),
        "",
        "`expected_sha256` pins the agent file to the hash above (`IntegrityError` otherwise); add `revision=` with a"
        " commit of this repo to pin the download too. `training=False` skips the optimizer state, which acting does not"
        " need; leave it out to continue training from the saved state.",
        "",
    ]
    return "\n".join(lines)


def _model_index(algo: str, env_id: str, evaluation: Evaluation) -> list[str]:
    """The ``model-index`` metadata of huggingface_sb3's cards (``metadata_eval_result``)."""
    value = f"{evaluation.mean_reward:.2f} +/- {evaluation.std_reward:.2f}"
    return [
        "model-index:",
        f"- name: {json.dumps(algo)}",
        "  results:",
        "  - task:",
        "      type: reinforcement-learning",
        "      name: reinforcement-learning",
        "    dataset:",
        f"      name: {json.dumps(env_id)}",
        f"      type: {json.dumps(env_id)}",
        "    metrics:",
        "    - type: mean_reward",
        f"      value: {json.dumps(value)}",
        "      name: mean_reward",
        "      verified: false",
    ]


def usage_snippet(
    manifest: Manifest,
    env_id: str,
    filename: str,
    sha256: str,
    repo_id: str | None,
    statistics: str | None,
    statistics_sha256: str | None,
    trusted: list[str],
    deterministic: bool = True,
) -> list[str]:
    """The card's ``python`` block: it downloads and loads everything the folder ships, then runs the agent."""
    repo = json.dumps(repo_id or "<repo_id>")
    separate = statistics is not None and statistics != filename
    names = ["load_from_hub"] + (["file_sha256", "load_vecnormalize"] if separate else [])
    lines = ["```python"]
    if separate:
        lines.append("from huggingface_hub import hf_hub_download")
    lines += [
        "from stable_baselines3.common.env_util import make_vec_env",
        f"from sb3_safe_save import {', '.join(sorted(names))}",
        "",
        f"env = make_vec_env({json.dumps(env_id)})",
    ]
    if separate:
        lines += [
            "# the VecNormalize statistics the agent was trained with, checked against the hash on this card",
            f"statistics = hf_hub_download({repo}, {json.dumps(statistics)})",
            f"if file_sha256(statistics) != {json.dumps(statistics_sha256)}:",
            f"    raise ValueError({json.dumps(f'{statistics} is not the file this card describes')})",
            "env = load_vecnormalize(statistics, env)",
        ]
    factories = set(trusted)
    resources = [
        p.key for p in manifest.placeholders if not p.optional and not (p.spec is not None and p.spec.factory in factories)
    ]
    for key in resources:
        (ph,) = (p for p in manifest.placeholders if p.key == key)
        lines.append(f"{key} = <your live {ph.type}>  # this agent needs it: see 'Live resources' above")
    args = [f"{repo}, {json.dumps(filename)}", f"expected_sha256={json.dumps(sha256)}", "env=env", "training=False"]
    if trusted:
        args.append(f"trusted={json.dumps(trusted)}")
    if resources:
        args.append("resources={" + ", ".join(f"{json.dumps(k)}: {k}" for k in resources) + "}")
    lines += ["model = load_from_hub(", *(f"    {a}," for a in args), ")", "env = model.get_env()"]
    if statistics is not None:
        lines += [
            "normalizer = model.get_vec_normalize_env()  # keep the statistics fixed, as rl-zoo3's enjoy does",
            "normalizer.training = False",
            "normalizer.norm_reward = False",
        ]
    lines += [
        "obs = env.reset()",
        "for _ in range(1000):",
        f"    action, _ = model.predict(obs, deterministic={deterministic})",
        "    obs, rewards, dones, infos = env.step(action)",
        "```",
    ]
    return lines


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
    eval_env: gym.Env[Any, Any] | VecEnv | None = None,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    video_length: int = 1000,
    load_kwargs: Mapping[str, Any] | None = None,
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
    :param eval_env: evaluate the agent on this env (``model-index``, ``results.json``, ``replay.mp4``)
    :param n_eval_episodes: the number of evaluation episodes
    :param deterministic: act deterministically while evaluating and recording
    :param video_length: the replay's length in steps (0: no replay)
    :param load_kwargs: ``load`` arguments to load a packaged file for the evaluation
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
            save_kwargs=save_kwargs, repo_id=repo_id, extra_files=extra_files, eval_env=eval_env,
            n_eval_episodes=n_eval_episodes, deterministic=deterministic, video_length=video_length,
            load_kwargs=load_kwargs,
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
    from sb3_safe_save._file import read_manifest
    from sb3_safe_save._mixin import safe
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
        return safe(algo, module=algo.__module__).load(path, expected_sha256=expected_sha256, stock=True, **load_kwargs)
    if algo is None:
        base = read_manifest(path).base_algorithm
        if TrustList(None).why(base, "algorithm") != "default":
            raise FormatError(
                f"{repo_id}/{filename}: its base algorithm {base} is not a stable_baselines3/sb3_contrib class;"
                " pass the class to load it with: load_from_hub(..., algo=MyAlgo)"
            )
        algo = TrustList(None).resolve(base, "base_algorithm", "algorithm")
    return safe(algo, module=algo.__module__).load(path, expected_sha256=expected_sha256, **load_kwargs)
