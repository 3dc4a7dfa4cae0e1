"""``external(obj)``: hold a live resource in a module without registering it.

``self.vlm_model = vlm_model`` in an ``nn.Module`` registers an ``nn.Module`` expert as a submodule. From
then on torch and SB3 treat it as part of the policy: its parameters are in ``parameters()``,
``state_dict()`` and the optimizer; ``.to()``, ``.train()`` and ``.eval()`` change it; and when the online
and target networks both hold it, SB3's target update (``polyak_update`` with ``tau=1.0`` in DQN) writes
``0 * w + 1 * w`` *into the same tensors in place*: after the first ``mul_(0)`` both sides are zero, so the
expert ends up all zeros.

``self.vlm_model = external(vlm_model)`` stores a small forwarding wrapper instead. It is not an
``nn.Module``, so ``nn.Module.__setattr__`` keeps it as a plain attribute: none of the above touches it.
Attribute access and calls reach the real object (calling the wrapper of an ``nn.Module`` runs its
``forward`` with its hooks).

Identity rules:

* ``external(x) is not x``, and ``isinstance(external(x), type(x))`` is False (it must not look like an
  ``nn.Module``, or torch would register it). ``unwrap(w) is x``; ``unwrap`` of anything else returns it
  unchanged, so ``unwrap(self.vlm_model) is expert`` holds whether or not it was wrapped.
* ``external(w)`` of a wrapper returns ``w``; ``external(None)`` is None (an optional expert stays None).
* Two calls on one object give two wrappers that compare equal (``==`` and ``hash`` are those of the
  object). ``copy.copy`` and ``copy.deepcopy`` return the wrapper itself: a copied policy shares the
  live resource. Pickling raises ``UnsupportedObjectError``: save with sb3_safe_save, which stores a
  placeholder instead.
* ``save`` makes a placeholder of the object (reason ``"external"``), keyed by its name in
  ``policy_kwargs`` when it is there too. ``load(..., resources={"vlm_model": x})`` takes the object or
  its wrapper; a path that held the wrapper at save gets a wrapper back, a path that held the object gets
  the object.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar, overload

from sb3_safe_save._errors import UnsupportedObjectError

T = TypeVar("T")


class External(Generic[T]):
    """A live resource kept out of the module system; forwards attribute access and calls to it.

    Build it with ``external(obj)``; get the object back with ``unwrap(wrapper)``.
    """

    __slots__ = ("_sb3_external_obj",)

    def __init__(self, obj: T) -> None:
        object.__setattr__(self, "_sb3_external_obj", obj)

    @property
    def __wrapped__(self) -> T:
        """The real object (also what ``inspect.unwrap`` and ``inspect.signature`` follow)."""
        return object.__getattribute__(self, "_sb3_external_obj")  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_sb3_external_obj"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_sb3_external_obj"), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(object.__getattribute__(self, "_sb3_external_obj"), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return object.__getattribute__(self, "_sb3_external_obj")(*args, **kwargs)

    def __dir__(self) -> list[str]:
        return dir(object.__getattribute__(self, "_sb3_external_obj"))

    def __repr__(self) -> str:
        return f"external({object.__getattribute__(self, '_sb3_external_obj')!r})"

    def __bool__(self) -> bool:
        return bool(object.__getattribute__(self, "_sb3_external_obj"))

    def __len__(self) -> int:
        return len(object.__getattribute__(self, "_sb3_external_obj"))

    def __iter__(self) -> Iterator[Any]:
        return iter(object.__getattribute__(self, "_sb3_external_obj"))

    def __getitem__(self, key: Any) -> Any:
        return object.__getattribute__(self, "_sb3_external_obj")[key]

    def __eq__(self, other: object) -> bool:
        return bool(object.__getattribute__(self, "_sb3_external_obj") == unwrap(other))

    def __hash__(self) -> int:
        return hash(object.__getattribute__(self, "_sb3_external_obj"))

    def __copy__(self) -> External[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> External[T]:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        obj = object.__getattribute__(self, "_sb3_external_obj")
        cls = type(obj)
        raise UnsupportedObjectError(
            [
                (
                    f"external({cls.__qualname__})",
                    f"{cls.__module__}.{cls.__qualname__}",
                    "an external() resource is never pickled; save the model with sb3_safe_save (the resource"
                    " becomes a placeholder, rebound with load(..., resources=...)), or pickle unwrap(obj) yourself",
                )
            ]
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


@overload
def external(obj: None) -> None: ...
@overload
def external(obj: External[T]) -> External[T]: ...
@overload
def external(obj: T) -> External[T]: ...
def external(obj: Any) -> Any:
    """Wrap a live resource so that a module holding it does not register it.

    Use it where a module stores an expert it did not create::

        self.vlm_model = external(vlm_model)   # not in parameters(), state_dict(), the optimizer, .to(), .train()
        logits = self.vlm_model(input_ids)      # calls and attributes reach the real object

    :param obj: the resource (an ``nn.Module``, an LLM engine, any object); a wrapper or None is returned as is
    :return: an ``External`` forwarding to ``obj`` (see the module docstring for the identity rules)
    """
    if obj is None or type(obj) is External:
        return obj
    return External(obj)


@overload
def unwrap(obj: External[T]) -> T: ...
@overload
def unwrap(obj: T) -> T: ...
def unwrap(obj: Any) -> Any:
    """The real object behind ``external(obj)``; anything else is returned unchanged.

    :param obj: a wrapper or any object
    :return: the wrapped object, or ``obj`` itself
    """
    if type(obj) is External:
        return object.__getattribute__(obj, "_sb3_external_obj")
    return obj
