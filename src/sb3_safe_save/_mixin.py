"""``SafeSaveMixin`` and ``safe()``: SB3's ``save``/``load`` signatures, our format underneath.

The methods hand over to ``_persist.save_model`` / ``_persist.load_model``. That module (and pydantic,
the codecs, the walker) is imported on the first save or load, not when this class is defined: user
modules that define ``class MyDQN(SafeSaveMixin, DQN)`` are imported by every ``SubprocVecEnv``
worker, which should not pay for it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save._errors import StateMismatchError

if TYPE_CHECKING:
    import io
    import os

    import torch as th
    from stable_baselines3.common.type_aliases import GymEnv
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_safe_save._file import PathLike
    from sb3_safe_save._manifest import ResourceSpec
    from sb3_safe_save._trust import TrustSpec

SelfAlgo = TypeVar("SelfAlgo", bound=BaseAlgorithm)


class SafeSaveMixin:
    """Give an SB3 algorithm safe ``save``/``load``: ``class CustomDQN(SafeSaveMixin, DQN): ...``.

    Class-level declarations (all optional):

    :cvar safe_save_resources: resource key -> attribute path of a live object to leave out,
        e.g. ``{"vlm_model": "policy_kwargs.vlm_model"}`` (the walker also finds them by itself)
    :cvar safe_save_specs: resource key -> ``ResourceSpec`` telling load how to rebuild it
    :cvar safe_save_optional: resource keys that may stay unbound at load
    :cvar safe_save_trusted: classes (or ``"module:QualName"`` strings, or resource factories) that
        files loaded with this class may reference, beyond the default list and the classes defined in
        this class's own module, e.g. ``(CustomDQNPolicy,)`` for a policy that lives in another module
    :cvar safe_save_externalize: after the policy is built, replace every registration of an ``nn.Module``
        resource (one passed in ``policy_kwargs``) by its ``external()`` wrapper and take its parameters out
        of the optimizers: ``self.vlm_model = vlm_model`` then behaves as ``self.vlm_model = external(vlm_model)``

    When the model is built or loaded, and when ``learn()`` starts, what training would do to a resource is
    checked from facts (``HazardWarning``; ``HazardError`` before a target update that would destroy it).
    """

    safe_save_resources: ClassVar[Mapping[str, str]] = {}
    safe_save_specs: ClassVar[Mapping[str, ResourceSpec | Mapping[str, Any]]] = {}
    safe_save_optional: ClassVar[Sequence[str]] = ()
    safe_save_trusted: ClassVar[Sequence[type | str | Any]] = ()
    safe_save_externalize: ClassVar[bool] = False

    def _setup_model(self) -> None:
        from sb3_safe_save._hazards import guard_build

        with guard_build(self, externalize=self.safe_save_externalize):  # type: ignore[arg-type]
            super()._setup_model()  # type: ignore[misc]

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        from sb3_safe_save._hazards import check_before_learn

        check_before_learn(self)  # type: ignore[arg-type]
        callback = kwargs.get("callback", args[1] if len(args) > 1 else None)
        _warn_pickled_vecnormalize(self, callback)
        return super()._setup_learn(*args, **kwargs)  # type: ignore[misc]

    def save(
        self,
        path: PathLike,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
        *,
        resources: Mapping[str, Any] | None = None,
        specs: Mapping[str, ResourceSpec | Mapping[str, Any]] | None = None,
        optional: Iterable[str] = (),
        allow_pickle: bool = False,
        max_object_bytes: int | None = None,
        fsync: bool = True,
        vec_normalize: VecNormalize | None = None,
    ) -> None:
        """Save all the attributes of the object and the model parameters in one safetensors file.

        Live resources (objects held through ``external()``, external modules, unpicklable or oversized
        objects) are left out and recorded as placeholders, to be rebound at load. The write is atomic:
        the previous file at ``path`` survives any failure (for URLs, see the README's table per storage
        backend). An error-level hazard (e.g. an expert registered in both ``q_net`` and ``q_net_target``,
        which the target update zeroes) is warned as ``HazardWarning``, once per model.

        Saving from another thread while ``learn()`` runs writes a complete file that loads: each tensor's
        checksum is of the bytes written. It is not a snapshot of one moment: the attributes and random
        state are read first, then each tensor is copied, 256 KiB at a time, as it is written, so tensors
        (and the pieces of a larger one) may come from different optimizer steps. For a consistent or
        exactly resumable file, save from the training thread: between ``learn()`` calls or in a callback
        (``ResumeCheckpointCallback``).

        :param path: path to the file, or a URL such as ``s3://bucket/key`` (the ``remote`` extra);
            a path without a suffix gets ``.safetensors``
        :param exclude: name of parameters that should be excluded in addition to the default ones
        :param include: name of parameters that might be excluded but should be included anyway
        :param resources: resource key -> live object to leave out as a placeholder with that key
        :param specs: resource key -> ``ResourceSpec`` (how to rebuild it at load)
        :param optional: resource keys that may stay unbound at load
        :param allow_pickle: cloudpickle values no codec can store (marked in the file; load then
            needs ``allow_pickle=True``) instead of raising ``UnsupportedObjectError``
        :param max_object_bytes: objects whose pickle would be larger become ``too_large`` placeholders
            (None: 16 MiB)
        :param fsync: flush the file and its directory to disk before returning
        :param vec_normalize: a ``VecNormalize`` (e.g. ``self.get_vec_normalize_env()``) whose settings
            and statistics to store in the same file; ``load(path, env=venv)`` then wraps ``venv`` in it
        """
        from sb3_safe_save._persist import save_model

        save_model(
            self,  # type: ignore[arg-type]
            path, exclude, include, resources=resources, specs=specs, optional=optional,
            allow_pickle=allow_pickle, max_object_bytes=max_object_bytes, fsync=fsync, vec_normalize=vec_normalize,
        )  # fmt: skip

    @classmethod
    def load(  # type: ignore[no-untyped-def]
        cls,
        path: PathLike,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        *,
        resources: Mapping[str, Any] | None = None,
        trusted: TrustSpec | None = None,
        allow_pickle: bool = False,
        verify: bool = True,
        expected_sha256: str | None = None,
        strict: bool = True,
        restore_random_state: bool = True,
        training: bool = True,
        stock: bool = False,
        **kwargs: Any,
    ):
        """Load the model from a file written by ``save``.

        Warning: ``load`` re-creates the model from scratch, it does not update it in-place!

        :param path: path to the file, a URL such as ``s3://bucket/key`` (the ``remote`` extra), or a seekable
            binary file object
        :param env: the new environment to run the loaded model on. If the file holds VecNormalize
            statistics (saved with ``vec_normalize=``), ``env`` is wrapped in a restored ``VecNormalize``
            (or, if it already has one, that one gets the stored statistics); get it back with
            ``model.get_vec_normalize_env()``
        :param device: Device on which the code should run.
        :param custom_objects: objects to use instead of the stored values, keyed by attribute name
            or dotted path (``"policy_kwargs.vlm_model"``); a replaced value is not decoded at all
        :param print_system_info: print the versions the file was saved with and the current ones
        :param force_reset: Force call to ``reset()`` before training (see SB3 #597)
        :param resources: placeholder key -> live object (or its ``external()`` wrapper), ``factory(fn)`` or
            ``lazy(fn)``; a path that held a wrapper at save gets a wrapper, any other path the object
        :param trusted: classes or ``"module:QualName"`` strings the file may reference beyond the defaults
        :param allow_pickle: unpickle values that were saved with ``allow_pickle=True`` (runs code!)
        :param verify: check every tensor's checksum while reading (default)
        :param expected_sha256: refuse the file unless its SHA-256 matches
        :param strict: a resource whose fingerprint differs raises (``False``: warn)
        :param restore_random_state: put back the random state saved with the model (torch, numpy,
            ``random``, the spaces', gSDE noise and, when ``env`` is given, each env's generator), so
            that training continues exactly as if it had never stopped. ``False``: SB3's behaviour,
            which reseeds from ``model.seed``
        :param training: ``False`` loads for evaluation (``predict``, ``evaluate_policy``): the optimizer
            state is neither read nor verified, and no optimizer is built (constructing one imports
            ``torch._dynamo``, about a second in a fresh process). ``learn()``, ``save()`` or
            ``set_parameters()`` afterwards build a fresh optimizer on first use and warn
        :param stock: ``path`` is a stock SB3 zip (``model.save`` of SB3 itself): read it without running its
            pickles (the documentation's "Stock SB3 files"); ``env``, ``device``, ``custom_objects``, ``force_reset``,
            ``trusted``, ``expected_sha256`` and ``kwargs`` apply as above, the other options do not (a stock zip
            has no checksums, placeholders or random state). A pickle that names what the trust rules refuse raises
            ``StockPickleRefusedError`` naming it
        :param kwargs: extra arguments to change the model when loading
        :return: new model instance with loaded parameters
        """
        from sb3_safe_save._persist import load_model

        if stock:
            from sb3_safe_save._stock import load_stock

            return load_stock(
                cls, path, env, device, custom_objects, force_reset, trusted=trusted, expected_sha256=expected_sha256, **kwargs
            )

        return load_model(  # type: ignore[type-var]
            cls,
            path, env, device, custom_objects, print_system_info, force_reset,
            resources=resources, trusted=trusted, allow_pickle=allow_pickle, verify=verify,
            expected_sha256=expected_sha256, strict=strict, restore_random_state=restore_random_state,
            training=training, **kwargs,
        )  # fmt: skip

    def set_parameters(
        self,
        load_path_or_dict: str | os.PathLike[str] | io.BufferedIOBase | dict[str, Any],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """Load parameters (weights and optimizer state) in place, from a file written by ``save`` or a dict.

        A dict, or a stock SB3 zip, goes to SB3's own ``set_parameters`` (which reads a zip's tensors
        with ``torch.load(weights_only=True)``).

        :param load_path_or_dict: a file written by ``save``, a stock SB3 zip, or a dict of state dicts
        :param exact_match: the file must hold exactly the model's state dicts and keys
        :param device: used only for a stock SB3 zip (our tensors go straight into the model's memory)
        """
        from sb3_safe_save._persist import is_sb3_zip, load_parameters

        if isinstance(load_path_or_dict, dict) or is_sb3_zip(load_path_or_dict):
            super().set_parameters(load_path_or_dict, exact_match, device)  # type: ignore[misc]
            return
        load_parameters(self, load_path_or_dict, exact_match=exact_match)  # type: ignore[arg-type]

    def save_replay_buffer(self, path: str | os.PathLike[str] | io.BufferedIOBase, *, fsync: bool = True) -> None:
        """Save the replay buffer to a safetensors file: only the filled rows, streamed, no pickle.

        Stores ``pos``, ``full``, the settings and ``HerReplayBuffer``'s episode bookkeeping. The
        file keeps the name you give (a path without a suffix gets ``.safetensors``); the write is atomic.

        :param path: path to the file (its directory is created if necessary), or a binary stream
        :param fsync: flush the file and its directory to disk before returning
        """
        from sb3_safe_save._buffers import save_buffer

        buffer = getattr(self, "replay_buffer", None)
        if buffer is None:
            raise StateMismatchError(f"{type(self).__qualname__} has no replay buffer (only off-policy algorithms have one)")
        save_buffer(buffer, path, fsync=fsync)

    def load_replay_buffer(
        self,
        path: str | os.PathLike[str] | io.BufferedIOBase,
        truncate_last_traj: bool = True,
        *,
        allow_pickle: bool = False,
        verify: bool = True,
    ) -> None:
        """Load a replay buffer from a file written by ``save_replay_buffer``.

        As in SB3, the model then holds the file's buffer: the model's own is filled in place when its
        ``buffer_size``, ``n_envs`` and ``optimize_memory_usage`` match the file's; otherwise (or when
        ``model.replay_buffer`` is None) a new buffer of the model's ``replay_buffer_class`` is built with
        the file's settings. The file's buffer class must be the model's ``replay_buffer_class``.

        :param path: the file (recognised by content: a ``.pkl`` name may hold our format), or a binary stream
        :param truncate_last_traj: When using ``HerReplayBuffer`` with online sampling:
            If set to ``True``, we assume that the last trajectory in the replay buffer was finished
            (and truncate it).
            If set to ``False``, we assume that we continue the same trajectory (same episode).
        :param allow_pickle: load a pickled buffer (SB3's format) with SB3's loader: runs code! Without it, SB3's
            ``ReplayBuffer``/``DictReplayBuffer`` pickles are read by the restricted reader of stock files
            (nothing in them is run), then checked and loaded as a file of ours
        :param verify: check every tensor's checksum while reading
        """
        from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

        from sb3_safe_save._buffers import buffer_for, is_pickle, load_buffer_into, read_buffer_header

        if is_pickle(path):
            if allow_pickle:
                super().load_replay_buffer(path, truncate_last_traj)  # type: ignore[misc]
                return
            import io as _io

            from sb3_safe_save._stock import read_buffer

            path = _io.BytesIO(read_buffer(path))  # SB3's pickle, read without running it, as our own format
        buffer = buffer_for(self, read_buffer_header(path))  # type: ignore[arg-type]
        load_buffer_into(buffer, path, verify=verify)
        self.replay_buffer = buffer
        if isinstance(buffer, HerReplayBuffer) and truncate_last_traj:
            buffer.truncate_last_trajectory()
        buffer.device = self.device  # type: ignore[attr-defined]  # as SB3 does (GH#1561)


def _warn_pickled_vecnormalize(model: Any, callback: Any) -> None:
    """``CheckpointCallback(save_vecnormalize=True)`` with a stock ``VecNormalize`` writes pickles: say so once.

    A subclass with its own ``_on_step`` (``sb3_safe_save.zoo``'s writes safetensors) is left to itself.
    """
    from stable_baselines3.common.callbacks import CheckpointCallback

    from sb3_safe_save._vecnormalize import SafeVecNormalize

    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is None or isinstance(vec_normalize, SafeVecNormalize):
        return
    pending, seen = [callback], 0
    while pending and seen < 100:
        cb, seen = pending.pop(), seen + 1
        if isinstance(cb, (list, tuple)):
            pending.extend(cb)
        elif isinstance(cb, CheckpointCallback) and cb.save_vecnormalize and type(cb)._on_step is CheckpointCallback._on_step:
            from sb3_safe_save._hazards import warn_once

            warn_once(
                model, ("pickled_vecnormalize",),
                "CheckpointCallback(save_vecnormalize=True) with a stock VecNormalize writes its statistics as pickles"
                " (.pkl) next to every checkpoint, which load only by unpickling. Wrap the env in"
                " sb3_safe_save.SafeVecNormalize instead of VecNormalize (its save() writes safetensors), or use"
                " sb3_safe_save.ResumeCheckpointCallback (one file per checkpoint).",
                UserWarning,
            )  # fmt: skip
            return
        else:
            pending.extend(c for c in (getattr(cb, "callbacks", None) or [], getattr(cb, "callback", None)) if c is not None)


_safe_lock = threading.Lock()
_safe_cache: dict[tuple[type, frozenset[str], bool, str], type] = {}


def safe(
    algo: type[SelfAlgo],
    *,
    trusted: Iterable[type | str | Any] = (),
    externalize: bool = False,
    module: str | None = None,
) -> type[SelfAlgo]:
    """Return a (cached) subclass of ``algo`` with safe ``save``/``load``: ``safe(PPO)("MlpPolicy", env)``.

    The class is named ``Safe<Algo>`` (``SafeDQN``) and belongs to the module that calls ``safe()``, so
    the classes defined there (your policy) are trusted by its ``load``, as for ``class MyDQN(SafeSaveMixin, DQN)``.

    :param algo: any ``BaseAlgorithm`` subclass (SB3, sb3-contrib or your own)
    :param trusted: classes (or ``"module:QualName"`` strings) that files loaded with the returned
        class may reference, e.g. ``safe(DQN, trusted=[CustomDQNPolicy])``; it becomes the class's
        ``safe_save_trusted`` (added to what ``algo`` already declares)
    :param externalize: the class's ``safe_save_externalize`` (see ``SafeSaveMixin``)
    :param module: the module the class belongs to (default: the caller's)
    :return: the subclass; the same class for the same arguments
    """
    from sb3_safe_save._trust import declared_trust, ref_of

    if not (isinstance(algo, type) and issubclass(algo, BaseAlgorithm)):
        raise TypeError(f"safe() takes a stable_baselines3 algorithm class, got {algo!r}")
    if isinstance(trusted, (str, type, bool)):
        raise TypeError(f"safe(..., trusted=) takes a list of classes or 'module:QualName' strings, got {trusted!r}")
    items = tuple(trusted)
    names = frozenset(i if isinstance(i, str) else ref_of(i) for i in items)
    if issubclass(algo, SafeSaveMixin) and not names and not externalize:
        return algo
    if module is None:
        module = sys._getframe(1).f_globals.get("__name__", algo.__module__)
    with _safe_lock:
        key = (algo, names, externalize, module)
        if key not in _safe_cache:
            name = algo.__name__ if issubclass(algo, SafeSaveMixin) else f"Safe{algo.__name__}"
            namespace: dict[str, Any] = {"__module__": module, "__qualname__": name, "_sb3_safe_base": algo}
            if names:
                namespace["safe_save_trusted"] = (*getattr(algo, "safe_save_trusted", ()), *items)
            if externalize:
                namespace["safe_save_externalize"] = True
            bases = (algo,) if issubclass(algo, SafeSaveMixin) else (SafeSaveMixin, algo)
            _safe_cache[key] = type(name, bases, namespace)
            declared_trust(_safe_cache[key])  # refuse malformed entries now, not at the first load
        return _safe_cache[key]
