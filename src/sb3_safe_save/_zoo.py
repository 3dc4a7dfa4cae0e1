"""rl-zoo3's own ``train`` and ``enjoy`` loops, with every artifact in our format and configs read safely.

``python -m sb3_safe_save.zoo train|enjoy ARGS`` runs ``rl_zoo3.train.train()`` / ``rl_zoo3.enjoy.enjoy()``
unchanged, inside ``patched_zoo()``, which swaps these names for the duration of the call (and puts the
originals back afterwards):

====================================================  ==========================================================
rl-zoo3 name                                          replaced by
====================================================  ==========================================================
``rl_zoo3.utils.ALGOS`` (one dict, shared by          the same dict with ``safe(cls)`` values: every
``train``, ``enjoy`` and ``exp_manager``)              ``save``/``load`` uses our format
``rl_zoo3.train.ExperimentManager``                   ``SafeExperimentManager`` (overrides listed on the class)
``rl_zoo3.exp_manager.SimpleLinearSchedule``          SB3's ``LinearSchedule(v, 0, 1)``: the same line, stored
                                                      as data, loadable without rl-zoo3 (default trust)
``rl_zoo3.exp_manager.CheckpointCallback``            ``SafeCheckpointCallback``: ``rl_model_N_steps.safetensors``
``rl_zoo3.exp_manager.SaveVecNormalizeCallback``      ``SafeSaveVecNormalizeCallback``: ``vecnormalize.safetensors``
``rl_zoo3.enjoy.get_model_path``                      ``get_model_path``: ``.safetensors`` names
``rl_zoo3.enjoy.get_saved_hyperparams``               ``get_saved_hyperparams``: safe YAML, no ``eval``
``rl_zoo3.enjoy.create_test_env``                     ``create_test_env``: VecNormalize from our file
``rl_zoo3.enjoy.yaml``                                a shim whose ``load`` is the safe config loader (args.yml)
``rl_zoo3.enjoy.download_from_hub``                   refuses: the ``sb3`` organisation's agents are pickles
====================================================  ==========================================================

What rl-zoo3 does unsafely and what happens here instead:

* ``config.yml``/``args.yml`` are written with ``yaml.dump`` (Python tags) and read with ``yaml.UnsafeLoader``:
  here they are written as plain YAML (classes by dotted name, other objects by ``repr``) and read with a
  ``SafeLoader`` that also understands the two tags stock rl-zoo3 writes (``OrderedDict``, ``tuple``).
* ``normalize: "dict(norm_obs=True, norm_reward=False)"`` is ``eval()``-ed (rl-zoo #505): here only a dict
  literal or ``dict(key=literal, ...)`` is accepted.
* ``env_wrapper``/``vec_env_wrapper`` named in a saved config are imported and called by ``enjoy``: here
  they must be wrapper or callback classes defined under ``_trust.ZOO_PACKAGES``, or given with ``--trust``;
  and their arguments from the config may not name files or folders (``_trust.ZOO_PATH_ARGUMENTS``:
  ``VecMonitor(filename=...)`` would truncate a file of the caller's and create folders anywhere writable).
* text from a config reaches the terminal only escaped (``python -m sb3_safe_save.zoo`` prints errors,
  tracebacks and warnings through the CLI's ``clean``): no ANSI escape, bell or bidirectional override.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml
from rl_zoo3.exp_manager import ExperimentManager
from rl_zoo3.utils import ALGOS
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize

from sb3_safe_save._errors import FormatError, PickleRefusedError, UntrustedTypeError
from sb3_safe_save._mixin import safe
from sb3_safe_save._trust import ZOO_PACKAGES, ZOO_PATH_ARGUMENTS, ZOO_SLOTS, zoo_path_arguments, zoo_refusals

#: rl-zoo3 versions (major, minor) whose ``ExperimentManager``/``enjoy`` this module was written against and tested on.
SUPPORTED_RL_ZOO3: tuple[tuple[int, int], ...] = ((2, 9),)
SUFFIX = ".safetensors"
VECNORMALIZE = "vecnormalize" + SUFFIX
REPLAY_BUFFER = "replay_buffer" + SUFFIX


class ZooUsageError(Exception):
    """A command line the safe zoo refuses (printed as a usage error, exit status 2)."""


def check_version(version: str) -> None:
    """Raise ``ZooUsageError`` unless ``version`` is an rl-zoo3 release listed in ``SUPPORTED_RL_ZOO3``."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor not in SUPPORTED_RL_ZOO3:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_RL_ZOO3)
        raise ZooUsageError(
            f"sb3_safe_save.zoo supports rl_zoo3 {supported}, but rl_zoo3 {version} is installed: it patches rl-zoo3's"
            f" ExperimentManager and enjoy script, which change between releases. Install a supported one:"
            f' pip install "sb3-safe-save[zoo]"'
        )


# ------------------------------------------------------------------------------------------ configs
class ConfigLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` plus the two Python tags stock rl-zoo3 writes into config.yml/args.yml."""


def _ordered_dict(loader: ConfigLoader, node: yaml.Node) -> dict[Any, Any]:
    args = loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else None
    if not args or len(args) != 1 or not all(isinstance(p, list) and len(p) == 2 for p in args[0]):
        raise FormatError(f"an OrderedDict tag {node.start_mark} that is not a list of key/value pairs")
    return dict(args[0])


def _tuple(loader: ConfigLoader, node: yaml.Node) -> tuple[Any, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise FormatError(f"a tuple tag {node.start_mark} that is not a sequence")
    return tuple(loader.construct_sequence(node, deep=True))


ConfigLoader.add_constructor("tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _ordered_dict)
ConfigLoader.add_constructor("tag:yaml.org,2002:python/tuple", _tuple)


def load_config(stream: TextIO | str, where: str = "the config") -> Any:
    """Read rl-zoo3 YAML (config.yml, args.yml) without running code: plain YAML, OrderedDict and tuple tags only."""
    try:
        return yaml.load(stream, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        raise FormatError(
            f"{where} uses a YAML tag that constructs Python objects ({e.problem}, {e.problem_mark}); sb3_safe_save.zoo"
            " reads plain YAML only. Remove the tagged value (rl-zoo3's enjoy needs only normalize, env_kwargs,"
            " env_wrapper, vec_env_wrapper and frame_stack from it)"
        ) from None
    except yaml.YAMLError as e:
        raise FormatError(f"{where} is not valid YAML: {e}") from None


class ConfigDumper(yaml.SafeDumper):  # type: ignore[misc]
    """Plain YAML: OrderedDicts as mappings, tuples as lists, classes by dotted name, other objects by ``repr``."""


def _represent_other(dumper: ConfigDumper, value: Any) -> yaml.Node:
    if isinstance(value, dict):
        return dumper.represent_dict(value)
    if isinstance(value, tuple):
        return dumper.represent_list(value)
    if isinstance(value, (type, types.FunctionType)):
        return dumper.represent_str(f"{value.__module__}.{value.__qualname__}")
    return dumper.represent_str(repr(value))


ConfigDumper.add_multi_representer(object, _represent_other)


def dump_config(data: Any, stream: TextIO) -> None:
    """Write rl-zoo3 YAML that any safe loader reads back (and that stock rl-zoo3 still reads)."""
    yaml.dump(data, stream, Dumper=ConfigDumper, sort_keys=False)


def parse_normalize(value: Any, where: str = "normalize") -> tuple[bool, dict[str, Any]]:
    """rl-zoo3's ``normalize`` setting as (enabled, VecNormalize kwargs), without ``eval`` (rl-zoo #505).

    Accepts a bool, a mapping, a dict literal string (``"{'norm_obs': True}"``) or ``"dict(norm_obs=True, ...)"``
    whose values are literals.
    """
    if isinstance(value, bool) or value is None:
        return bool(value), {}
    if isinstance(value, dict):
        return True, _check_kwargs(dict(value), where)
    if isinstance(value, str):
        try:
            tree = ast.parse(value.strip(), mode="eval").body
            if isinstance(tree, ast.Dict):
                return True, _check_kwargs(ast.literal_eval(tree), where)
            if (
                isinstance(tree, ast.Call)
                and isinstance(tree.func, ast.Name)
                and tree.func.id == "dict"
                and not tree.args
                and all(kw.arg is not None for kw in tree.keywords)
            ):
                return True, _check_kwargs({str(kw.arg): ast.literal_eval(kw.value) for kw in tree.keywords}, where)
        except (SyntaxError, ValueError):
            pass
    raise FormatError(
        f"{where}: {value!r} is not a VecNormalize setting sb3_safe_save.zoo can read without eval(); use true/false,"
        " a mapping, or a string 'dict(norm_obs=True, norm_reward=False)' whose values are literals"
    )


def _check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise FormatError(f"{where}: the VecNormalize settings must map argument names to values, got {kwargs!r}")
    return kwargs


def check_wrappers(hyperparams: dict[str, Any], trusted: Sequence[str], where: str) -> None:
    """Refuse ``env_wrapper``/``vec_env_wrapper``/``callback`` names that ``_trust.zoo_refusals`` refuses, and
    arguments for them that name a file or a folder (``_trust.zoo_path_arguments``), before anything is imported."""
    names: dict[str, list[str]] = {}
    paths: list[str] = []
    for key in ZOO_SLOTS:
        value = hyperparams.get(key)
        for item in value if isinstance(value, list) else [] if value is None else [value]:
            with_kwargs = isinstance(item, dict) and len(item) == 1  # {name: kwargs}, as rl-zoo3 reads it
            name = str(next(iter(item)) if with_kwargs else item)
            names.setdefault(name, []).append(key)
            arguments = zoo_path_arguments(next(iter(item.values())) if with_kwargs else None)
            if arguments:
                paths.append(f"  {key}: {name}({', '.join(f'{a}=...' for a in arguments)})")
    if paths:
        raise FormatError(
            f"{where} gives wrappers or callbacks arguments that name a file or folder:\n" + "\n".join(paths) + "\n"
            "A saved config may not choose where enjoy writes (it could truncate your files or create folders"
            f" anywhere). Remove those arguments from {where}; refused: {', '.join(sorted(ZOO_PATH_ARGUMENTS))}"
        )
    refusals = zoo_refusals(names, list(trusted))
    if refusals:
        error = UntrustedTypeError([r.ref for r in refusals], {r.ref: [f"{where}: {k}" for k in r.paths] for r in refusals})
        lines = [f"  {r.ref} ({', '.join(r.paths)}): {r.reason}" for r in refusals]
        error.args = (
            f"{where} names wrappers or callbacks that enjoy would import and call:\n" + "\n".join(lines) + "\n"
            f"Trusted without asking: wrapper and callback classes defined under {', '.join(p + '.*' for p in ZOO_PACKAGES)}."
            " To trust more, pass --trust NAME (or --trust 'package.*') to python -m sb3_safe_save.zoo",
        )
        raise error


# ---------------------------------------------------------------------------------- enjoy's hooks
def get_model_path(
    exp_id: int,
    folder: str,
    algo: str,
    env_name: Any,
    load_best: bool = False,
    load_checkpoint: str | None = None,
    load_last_checkpoint: bool = False,
) -> tuple[str, str, str]:
    """``rl_zoo3.utils.get_model_path`` with ``.safetensors`` names; else rl-zoo3's stock ``.zip`` (read safely)."""
    from huggingface_sb3 import ModelName
    from rl_zoo3.utils import get_latest_run_id

    if exp_id == 0:
        exp_id = get_latest_run_id(os.path.join(folder, algo), env_name)
        print(f"Loading latest experiment, id={exp_id}")
    log_path = os.path.join(folder, algo, f"{env_name}_{exp_id}") if exp_id > 0 else os.path.join(folder, algo)
    if not os.path.isdir(log_path):
        raise ValueError(f"The {log_path} folder was not found")
    model_name = ModelName(algo, env_name)
    if load_best:
        model_path, name_prefix = os.path.join(log_path, "best_model" + SUFFIX), f"best-model-{model_name}"
    elif load_checkpoint is not None:
        model_path = os.path.join(log_path, f"rl_model_{load_checkpoint}_steps{SUFFIX}")
        name_prefix = f"checkpoint-{load_checkpoint}-{model_name}"
    elif load_last_checkpoint:
        checkpoints = sorted(Path(log_path).glob(f"rl_model_*_steps{SUFFIX}"), key=lambda p: int(p.name.split("_")[-2]))
        if not checkpoints:
            raise ValueError(f"No checkpoint found for {algo} on {env_name}, path: {log_path}")
        model_path = str(checkpoints[-1])
        name_prefix = f"checkpoint-{checkpoints[-1].name.split('_')[-2]}-{model_name}"
    else:
        model_path, name_prefix = os.path.join(log_path, f"{env_name}{SUFFIX}"), f"final-model-{model_name}"
    if not os.path.isfile(model_path):
        stock = model_path.removesuffix(SUFFIX) + ".zip"
        if os.path.isfile(stock):  # rl-zoo3's own trained agent: enjoy reads it without running its pickles
            return name_prefix, stock, log_path
        raise ValueError(f"No model found for {algo} on {env_name}, path: {model_path}")
    return name_prefix, model_path, log_path


def get_saved_hyperparams(
    stats_path: str, norm_reward: bool = False, test_mode: bool = False, trusted: Sequence[str] = ()
) -> tuple[dict[str, Any], str | None]:
    """``rl_zoo3.utils.get_saved_hyperparams`` without ``UnsafeLoader`` and without ``eval``."""
    hyperparams: dict[str, Any] = {}
    if not os.path.isdir(stats_path):
        return hyperparams, None
    config_file = os.path.join(stats_path, "config.yml")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            loaded = load_config(f, config_file)
        if not isinstance(loaded, dict):
            raise FormatError(f"{config_file} must hold a mapping of hyperparameters, got {type(loaded).__name__}")
        hyperparams = loaded
        check_wrappers(hyperparams, trusted, config_file)
        normalize, normalize_kwargs = parse_normalize(hyperparams.get("normalize", False), f"{config_file}: normalize")
    else:
        normalize, normalize_kwargs = os.path.isfile(os.path.join(stats_path, VECNORMALIZE)), {}
    hyperparams["normalize"] = normalize
    if normalize:
        if isinstance(hyperparams.get("normalize"), bool) and not normalize_kwargs:
            normalize_kwargs = {"norm_obs": True, "norm_reward": norm_reward}
        elif test_mode:
            normalize_kwargs["norm_reward"] = norm_reward
        hyperparams["normalize_kwargs"] = normalize_kwargs
    return hyperparams, stats_path


def create_test_env(env_id: str, n_envs: int = 1, stats_path: str | None = None, **kwargs: Any) -> VecEnv:
    """``rl_zoo3.utils.create_test_env`` that restores VecNormalize statistics from ``vecnormalize.safetensors``
    (or rl-zoo3's ``vecnormalize.pkl``, read by the restricted reader of stock files)."""
    from rl_zoo3.utils import create_test_env as stock_create_test_env

    from sb3_safe_save._vecnormalize import load_vecnormalize

    hyperparams: dict[str, Any] = kwargs.pop("hyperparams", None) or {}
    env = stock_create_test_env(env_id, n_envs, None, hyperparams=hyperparams, **kwargs)  # None: no pickle lookups
    if stats_path is not None:
        if hyperparams.get("normalize"):
            print("Loading running average")
            path = os.path.join(stats_path, VECNORMALIZE)
            if not os.path.exists(path) and os.path.exists(os.path.join(stats_path, "vecnormalize.pkl")):
                path = os.path.join(stats_path, "vecnormalize.pkl")  # rl-zoo3's: read without running it
            if not os.path.exists(path):
                raise ValueError(f"VecNormalize stats {path} not found")
            env = load_vecnormalize(path, env)
            env.training = False
            env.norm_reward = False
        n_stack = hyperparams.get("frame_stack", 0)
        if n_stack > 0:
            print(f"Stacking {n_stack} frames")
            env = VecFrameStack(env, n_stack)
    return env


def _refuse_download(*args: Any, **kwargs: Any) -> None:
    raise PickleRefusedError(
        ["rl-trained-agents"],
        "sb3_safe_save.zoo does not download rl-trained-agents from the sb3 organisation: those are pickled zips."
        " Use sb3_safe_save.load_from_hub for agents shared in this format, or give -f a folder of your own runs",
    )


# ----------------------------------------------------------------------------------- train's hooks
class SafeCheckpointCallback(CheckpointCallback):
    """``CheckpointCallback`` whose files are named ``*.safetensors`` (rl-zoo3 passes ``.zip``/``.pkl``)."""

    def _checkpoint_path(self, checkpoint_type: str = "", extension: str = "") -> str:
        return os.path.join(self.save_path, f"{self.name_prefix}_{checkpoint_type}{self.num_timesteps}_steps{SUFFIX}")

    def _on_step(self) -> bool:
        vec_normalize = self.model.get_vec_normalize_env() if self.save_vecnormalize else None
        if vec_normalize is not None and self.n_calls % self.save_freq == 0:
            from sb3_safe_save._vecnormalize import save_vecnormalize

            save_vecnormalize(vec_normalize, self._checkpoint_path("vecnormalize_"))
        self.save_vecnormalize, saved = False, self.save_vecnormalize
        try:
            return super()._on_step()
        finally:
            self.save_vecnormalize = saved


class SafeSaveVecNormalizeCallback(BaseCallback):
    """rl-zoo3's ``SaveVecNormalizeCallback``, writing ``vecnormalize.safetensors`` with ``save_vecnormalize``."""

    def __init__(self, save_freq: int, save_path: str, name_prefix: str | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.save_freq, self.save_path, self.name_prefix = save_freq, save_path, name_prefix

    def _init_callback(self) -> None:
        os.makedirs(self.save_path, exist_ok=True)

    def _on_step(self) -> bool:
        from sb3_safe_save._vecnormalize import save_vecnormalize

        assert self.model is not None
        vec_normalize = self.model.get_vec_normalize_env()
        if self.n_calls % self.save_freq == 0 and vec_normalize is not None:
            name = VECNORMALIZE if self.name_prefix is None else f"{self.name_prefix}_{self.num_timesteps}_steps{SUFFIX}"
            save_vecnormalize(vec_normalize, os.path.join(self.save_path, name))
        return True


def _linear_schedule(initial_value: float | str) -> LinearSchedule:
    """rl-zoo3's ``lin_X`` schedule (``progress_remaining * X``) as SB3's own ``LinearSchedule(X, 0, 1)``."""
    return LinearSchedule(float(initial_value), 0.0, 1.0)


class SafeExperimentManager(ExperimentManager):
    """rl-zoo3's ``ExperimentManager`` with our format for every artifact.

    Overrides: ``__init__`` (continue from a ``.safetensors`` agent), ``_preprocess_normalization`` (no
    ``eval``), ``_maybe_normalize`` and ``save_trained_model`` (``vecnormalize.safetensors``),
    ``_load_pretrained_agent`` (``replay_buffer.safetensors``, ``trusted=``), ``_save_config`` (plain YAML)
    and ``hyperparameters_optimization`` (refused: it pickles the optuna study). ``patched_zoo`` subclasses it
    with the run's ``resume_from`` and ``trusted``.
    """

    resume_from: str = ""
    trusted: tuple[str, ...] = ()

    def __init__(self, args: argparse.Namespace, *pos: Any, **kwargs: Any) -> None:
        super().__init__(args, *pos, **kwargs)
        self.trained_agent = self.resume_from
        self.continue_training = bool(self.resume_from)
        args.trained_agent = self.resume_from  # train() saw "": its .zip-only check is bypassed

    def _preprocess_normalization(self, hyperparams: dict[str, Any]) -> dict[str, Any]:
        if "normalize" in hyperparams:
            self.normalize, self.normalize_kwargs = parse_normalize(hyperparams.pop("normalize"))
            if "gamma" in hyperparams:
                self.normalize_kwargs["gamma"] = hyperparams["gamma"]
        return hyperparams

    def _maybe_normalize(self, env: VecEnv, eval_env: bool) -> VecEnv:
        from sb3_safe_save._vecnormalize import load_vecnormalize

        folder = os.path.join(os.path.dirname(self.trained_agent), self.env_name)
        path = os.path.join(folder, VECNORMALIZE)
        if self.trained_agent and os.path.exists(path):
            print("Loading saved VecNormalize stats")
            env = load_vecnormalize(path, env)
            if eval_env:
                env.training = False
                env.norm_reward = False
            return env
        if self.trained_agent and os.path.exists(os.path.join(folder, "vecnormalize.pkl")):
            stock = os.path.join(folder, "vecnormalize.pkl")
            raise PickleRefusedError([stock], f"{stock} is a pickle; sb3_safe_save.zoo reads only {VECNORMALIZE}")
        if self.normalize:
            local_kwargs = dict(self.normalize_kwargs)
            if eval_env:
                local_kwargs.update(norm_reward=False, training=False)
            if self.verbose > 0:
                print(f"Normalization activated: {local_kwargs}" if local_kwargs else "Normalizing input and reward")
            env = VecNormalize(env, **local_kwargs)
        return env

    def _load_pretrained_agent(self, hyperparams: dict[str, Any], env: VecEnv) -> Any:
        print("Loading pretrained agent")
        hyperparams.pop("policy", None)  # the policy should not be changed
        hyperparams.pop("policy_kwargs", None)
        model = ALGOS[self.algo].load(
            self.trained_agent, env=env, seed=self.seed, tensorboard_log=self.tensorboard_log,
            verbose=self.verbose, device=self.device, trusted=list(self.trusted), **hyperparams,
        )  # fmt: skip
        buffer_path = os.path.join(os.path.dirname(self.trained_agent), REPLAY_BUFFER)
        if os.path.exists(buffer_path):
            print("Loading replay buffer")
            model.load_replay_buffer(buffer_path, truncate_last_traj=self.truncate_last_trajectory)  # type: ignore[attr-defined]
        return model

    def save_trained_model(self, model: Any) -> None:
        from sb3_safe_save._vecnormalize import save_vecnormalize

        print(f"Saving to {self.save_path}")
        model.save(os.path.join(self.save_path, f"{self.env_name}{SUFFIX}"))
        if self.save_replay_buffer and getattr(model, "replay_buffer", None) is not None:  # the mixin gives PPO the method too
            print("Saving replay buffer")
            model.save_replay_buffer(os.path.join(self.save_path, REPLAY_BUFFER))
        if self.normalize:
            save_vecnormalize(model.get_vec_normalize_env(), os.path.join(self.params_path, VECNORMALIZE))

    def _save_config(self, saved_hyperparams: dict[str, Any]) -> None:
        with open(os.path.join(self.params_path, "config.yml"), "w") as f:
            dump_config(dict(saved_hyperparams), f)
        with open(os.path.join(self.params_path, "args.yml"), "w") as f:
            dump_config({key: vars(self.args)[key] for key in sorted(vars(self.args))}, f)
        Path(self.params_path, "command.txt").write_text(" ".join(getattr(sys, "orig_argv", sys.argv)))
        print(f"Log path: {self.save_path}")

    def hyperparameters_optimization(self) -> None:
        raise ZooUsageError(
            "hyperparameter optimization is not supported by sb3_safe_save.zoo (rl-zoo3 pickles the optuna study);"
            " run it with rl-zoo3 itself, then train the chosen hyperparameters here"
        )


# -------------------------------------------------------------------------------------- patching
@contextlib.contextmanager
def _swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def patched_zoo(trained_agent: str = "", trusted: Sequence[str] = (), *, stock_zips: bool = False) -> Iterator[None]:
    """Swap rl-zoo3's names for the safe ones (see the module docstring) for the duration of the block.

    :param stock_zips: ``load`` of a ``.zip`` (rl-zoo3's trained agents) reads it with the restricted reader of
        stock files (``load(..., stock=True)``: none of its pickles run); ``enjoy`` only loads, never saves
    """
    import rl_zoo3.enjoy
    import rl_zoo3.exp_manager
    import rl_zoo3.train

    manager = type(
        "SafeExperimentManager", (SafeExperimentManager,), {"resume_from": trained_agent, "trusted": tuple(trusted)}
    )
    stock_algos = dict(ALGOS)
    yaml_shim = types.SimpleNamespace(
        load=lambda stream, Loader=None: load_config(stream, "args.yml"),
        UnsafeLoader=ConfigLoader,
    )

    def saved_hyperparams(stats_path: str, norm_reward: bool = False, test_mode: bool = False) -> Any:
        return get_saved_hyperparams(stats_path, norm_reward, test_mode, trusted)

    swaps = [
        (rl_zoo3.train, "ExperimentManager", manager),
        (rl_zoo3.exp_manager, "SimpleLinearSchedule", _linear_schedule),
        (rl_zoo3.exp_manager, "CheckpointCallback", SafeCheckpointCallback),
        (rl_zoo3.exp_manager, "SaveVecNormalizeCallback", SafeSaveVecNormalizeCallback),
        (rl_zoo3.enjoy, "get_model_path", get_model_path),
        (rl_zoo3.enjoy, "get_saved_hyperparams", saved_hyperparams),
        (rl_zoo3.enjoy, "create_test_env", create_test_env),
        (rl_zoo3.enjoy, "yaml", yaml_shim),
        (rl_zoo3.enjoy, "download_from_hub", _refuse_download),
    ]
    with contextlib.ExitStack() as stack:
        for obj, name, value in swaps:
            stack.enter_context(_swapped(obj, name, value))
        ALGOS.update(
            {name: _trusting(safe(cls, module=cls.__module__), trusted, stock_zips) for name, cls in stock_algos.items()}
        )
        try:
            yield
        finally:
            ALGOS.clear()
            ALGOS.update(stock_algos)


def _trusting(cls: type[Any], trusted: Sequence[str], stock_zips: bool = False) -> type[Any]:
    """``cls`` itself, or a subclass whose ``load`` passes ``trusted=`` (``--trust``: enjoy calls ``load`` itself)
    and, with ``stock_zips``, ``stock=True`` for a ``.zip`` (read without running its pickles)."""
    if not trusted and not stock_zips:
        return cls
    base_load = cls.load

    def load(klass: type[Any], path: Any, *args: Any, **kwargs: Any) -> Any:
        if trusted:
            kwargs.setdefault("trusted", list(trusted))
        if stock_zips and isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".zip"):
            kwargs.setdefault("stock", True)
        return base_load.__func__(klass, path, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {"load": classmethod(load), "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_sb3_safe_base": cls},
    )


# ------------------------------------------------------------------------------------ command line
_TRAINED_AGENT = "--trained-agent"


def _split_args(argv: list[str], *, take_agent: bool) -> tuple[list[str], str, list[str]]:
    """Take our ``--trust NAME`` (and for train ``-i/--trained-agent``: rl-zoo3 insists on ``.zip``) out of ``argv``."""
    rest: list[str] = []
    trained_agent = ""
    trusted: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        option, eq, value = token.partition("=")
        short_agent = take_agent and token.startswith("-i") and not token.startswith("--")
        long_agent = take_agent and token.startswith("--trai") and _TRAINED_AGENT.startswith(option)
        if short_agent and len(token) > 2:  # -iPATH or -i=PATH
            value = token[3:] if token.startswith("-i=") else token[2:]
        elif short_agent or long_agent or option == "--trust":
            if not eq:
                if i + 1 >= len(argv):
                    raise ZooUsageError(f"{option} needs a value")
                i += 1
                value = argv[i]
        else:
            rest.append(token)
            i += 1
            continue
        if short_agent or long_agent:
            trained_agent = value
        else:
            trusted.append(value)
        i += 1
    return rest, trained_agent, trusted


def _check_trained_agent(path: str) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise ZooUsageError(f"-i {path}: no such file")
    if not path.endswith(SUFFIX):
        hint = f" (convert a trusted stock zip once: sb3-safe-save convert {path} OUT{SUFFIX} --trust-pickle)"
        raise ZooUsageError(f"-i {path}: sb3_safe_save.zoo continues training from {SUFFIX} files only{hint}")


def run(command: str, argv: list[str]) -> None:
    """Run rl-zoo3's ``train`` or ``enjoy`` with ``argv`` (rl-zoo3's own arguments, plus ``--trust NAME``)."""
    from rl_zoo3.enjoy import enjoy
    from rl_zoo3.train import train

    if command == "push":
        push(argv)
        return
    if command not in ("train", "enjoy"):
        raise ZooUsageError(f"unknown command {command!r}: use 'train', 'enjoy' or 'push'")
    rest, trained_agent, trusted = _split_args(argv, take_agent=command == "train")
    if command == "train":
        _check_trained_agent(trained_agent)
        if any(a in ("-optimize", "--optimize-hyperparameters") for a in rest):
            raise ZooUsageError(
                "hyperparameter optimization is not supported by sb3_safe_save.zoo (rl-zoo3 pickles the optuna study);"
                " run it with rl-zoo3 itself, then train the chosen hyperparameters here"
            )
    entry: Callable[[], None] = train if command == "train" else enjoy
    old_argv = sys.argv
    sys.argv = [f"sb3_safe_save.zoo {command}", *rest]
    try:
        with patched_zoo(trained_agent, trusted, stock_zips=command == "enjoy"):
            entry()
    finally:
        sys.argv = old_argv


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ZooUsageError(message)


def push(argv: list[str]) -> None:
    """Share a run on the Hugging Face Hub: its model file, ``vecnormalize.safetensors`` and ``config.yml``.

    Mirrors rl-zoo3's ``push_to_hub`` arguments (``--algo``, ``--env``, ``-f``, ``--exp-id``, ``--load-best``,
    ``--load-checkpoint``, ``-n`` for the replay's steps, ``--no-render``, ``--stochastic``, ``--seed``); the agent is
    evaluated over ``--n-eval-episodes`` episodes (0: not evaluated) in the run's test env with its statistics, for
    the card's ``model-index``. ``--output FOLDER`` writes the repo folder without uploading; ``--trust NAME``
    trusts a custom class to load the run for the evaluation.
    """
    from huggingface_sb3 import EnvironmentName

    from sb3_safe_save._hub import package_for_hub, push_to_hub

    rest, _, trusted = _split_args(argv, take_agent=False)
    parser = _Parser(prog="python -m sb3_safe_save.zoo push")
    parser.add_argument("--algo", required=True, choices=sorted(ALGOS))
    parser.add_argument("--env", required=True, help="environment ID")
    parser.add_argument("-f", "--folder", default="logs", help="log folder")
    parser.add_argument("--exp-id", type=int, default=0, help="experiment ID (default: 0: latest, -1: no exp folder)")
    parser.add_argument("--load-best", action="store_true", help="share best_model instead of the final model")
    parser.add_argument("--load-checkpoint", type=int, help="share the checkpoint of this many timesteps")
    parser.add_argument("--repo-id", required=True, help="'org/name' on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--output", help="write the repo folder here instead of uploading it")
    parser.add_argument("--n-eval-episodes", type=int, default=10, help="evaluation episodes (0: no evaluation)")
    parser.add_argument("-n", "--n-timesteps", type=int, default=1000, help="steps of the replay video")
    parser.add_argument("--no-render", action="store_true", help="record no replay video")
    parser.add_argument("--stochastic", action="store_true", help="evaluate with stochastic actions")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation env's seed")
    args = parser.parse_args(rest)
    if args.n_eval_episodes < 0:
        raise ZooUsageError(f"--n-eval-episodes {args.n_eval_episodes}: give 0 (no evaluation) or more")
    env_name = EnvironmentName(args.env)
    checkpoint = None if args.load_checkpoint is None else str(args.load_checkpoint)
    _, model_path, log_path = get_model_path(args.exp_id, args.folder, args.algo, env_name, args.load_best, checkpoint)
    params = Path(log_path, env_name)
    extras = [path for path in (params / VECNORMALIZE, params / "config.yml") if path.is_file()]
    evaluation: dict[str, Any] = {}
    if args.n_eval_episodes:
        hyperparams, stats_path = get_saved_hyperparams(str(params), test_mode=True, trusted=trusted)
        env_kwargs = {} if args.no_render else {"render_mode": "rgb_array"}
        eval_env = create_test_env(
            env_name.gym_id, n_envs=1, stats_path=stats_path, seed=args.seed, log_dir=None, should_render=False,
            hyperparams=hyperparams, env_kwargs=env_kwargs,
        )  # fmt: skip
        evaluation = {
            "eval_env": eval_env,
            "n_eval_episodes": args.n_eval_episodes,
            "deterministic": not args.stochastic,
            "video_length": 0 if args.no_render else args.n_timesteps,
            "load_kwargs": {"trusted": trusted} if trusted else None,
        }
    if args.output:
        folder = package_for_hub(
            model_path, args.output, env_id=args.env, extra_files=extras, repo_id=args.repo_id, **evaluation
        )
        print(f"Wrote {folder}")
        return
    info = push_to_hub(
        model_path, args.repo_id, env_id=args.env, extra_files=extras, private=args.private or None, **evaluation
    )
    print(f"Pushed {model_path} to {info.commit_url}")
