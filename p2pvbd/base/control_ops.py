"""The control commands as a table: each op's name, its handler, and the arguments it takes.

A request's arguments are bound to the handler's signature, and checked against its annotations,
before the op runs: only a request that does not fit is "bad arguments" (a CLI and a daemon of
different versions, or a hand-made request). Whatever fails once the op runs is the op's own error: a
ControlError or one of the user errors the table was given is the user's message, anything else an
internal error the control server logs with its traceback.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pvbd.base.control import ControlError

OpHandler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ControlOp:
    name: str
    handler: OpHandler
    signature: inspect.Signature
    # Each parameter's annotation, evaluated (a module's `from __future__ import annotations` leaves strings).
    types: Mapping[str, Any]

    @classmethod
    def of(cls, name: str, handler: OpHandler) -> ControlOp:
        sig = inspect.signature(handler)
        hints = {p.name: _evaluated(handler, p.annotation) for p in sig.parameters.values()}
        return cls(name, handler, sig, hints)

    def bind(self, args: Mapping[str, Any]) -> inspect.BoundArguments:
        """The call's arguments; ControlError("bad arguments ...") unless they fit the signature."""
        try:
            bound = self.signature.bind(**args)
        except TypeError as e:
            raise ControlError(f"bad arguments for {self.name}: {e}") from None
        for arg, value in bound.arguments.items():
            if not fits(value, self.types[arg]):
                raise ControlError(f"bad arguments for {self.name}: {arg} cannot be {value!r}")
        return bound


class ControlOps:
    """Every control op of a daemon, registered by the services that own them, dispatched by name."""

    def __init__(self, user_errors: tuple[type[Exception], ...] = ()) -> None:
        self._ops: dict[str, ControlOp] = {}
        # Exceptions whose message is meant for the user wherever in an op they are raised.
        self._user_errors = user_errors

    def add(self, ops: Mapping[str, OpHandler]) -> None:
        for name, handler in ops.items():
            if name in self._ops:
                raise ValueError(f"control op {name!r} registered twice")
            self._ops[name] = ControlOp.of(name, handler)

    def names(self) -> list[str]:
        return sorted(self._ops)

    async def __call__(self, op: str, args: dict[str, Any]) -> Any:
        """Run ``op`` with ``args`` (a control server's handler)."""
        entry = self._ops.get(op.replace("-", "_"))
        if entry is None:
            raise ControlError(f"unknown command {op!r} (is the daemon older than this CLI?)")
        bound = entry.bind(args)
        try:
            return await entry.handler(*bound.args, **bound.kwargs)
        except self._user_errors as e:
            raise ControlError(str(e)) from e


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value``, as msgpack decodes it, is what ``annotation`` names: str, int, float (an int
    too), bool, bytes, None, list[X], dict, unions of these; anything else is taken as it is."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in params)
    if annotation is None or annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and (not params or all(fits(v, params[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _evaluated(handler: OpHandler, annotation: Any) -> Any:
    """A string annotation evaluated in the handler's module; Any when it names what only type checkers
    import (it is then not checked)."""
    if not isinstance(annotation, str):
        return annotation
    namespace = getattr(inspect.unwrap(getattr(handler, "__func__", handler)), "__globals__", {})
    try:
        return eval(annotation, dict(namespace))
    except Exception:
        return Any
