"""The control ops' table over a real control socket: a request that does not fit an op's signature is
"bad arguments", before the op runs; a failure inside an op is never mistaken for one."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pvbd.base import control
from p2pvbd.base.control import ControlError
from p2pvbd.base.control_ops import ControlOps
from p2pvbd.base.home import HomeError


class Service:
    def __init__(self) -> None:
        self.ran: list[str] = []

    async def op_create(self, name: str, size: int, tags: list[str] | None = None, rate: float = 1.0
                        ) -> dict[str, Any]:
        self.ran.append(name)
        return {"name": name, "size": size, "tags": tags, "rate": rate}

    async def op_broken(self, name: str) -> None:
        self.ran.append(name)
        len(5)  # type: ignore[arg-type]  # a bug deep in an op: a TypeError

    async def op_refuse(self, name: str) -> None:
        raise HomeError(f"invalid disk name {name!r}")


async def ask(sock: Path, op: str, **args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(control.call, sock, op, args, timeout=30))


async def test_arguments_are_bound_before_the_op_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = Service()
    ops = ControlOps(user_errors=(HomeError,))
    ops.add({"create": service.op_create, "broken": service.op_broken, "refuse": service.op_refuse})
    sock = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve_control, sock, ops)
        assert await ask(sock, "create", name="a", size=3, tags=["x"], rate=2) == {
            "name": "a", "size": 3, "tags": ["x"], "rate": 2}
        for args, why in (({"name": "b"}, "missing a required argument: 'size'"),
                          ({"name": "b", "size": 1, "colour": "red"}, "unexpected keyword argument 'colour'"),
                          ({"name": "b", "size": "big"}, "size cannot be 'big'"),
                          ({"name": "b", "size": True}, "size cannot be True"),
                          ({"name": "b", "size": 1, "tags": ["x", 2]}, "tags cannot be ['x', 2]"),
                          ({"name": "b", "size": 1, "rate": None}, "rate cannot be None")):
            with pytest.raises(ControlError) as e:
                await ask(sock, "create", **args)
            assert str(e.value).startswith("bad arguments for create: ") and why in str(e.value), e.value
        assert service.ran == ["a"]  # none of the bad requests reached the op
        with pytest.raises(ControlError) as e:
            await ask(sock, "broken", name="c")
        assert str(e.value).startswith("internal error in broken: TypeError"), e.value
        assert service.ran == ["a", "c"] and "Traceback" in caplog.text  # logged for whoever fixes it
        with pytest.raises(ControlError, match=r"^invalid disk name 'd'$"):
            await ask(sock, "refuse", name="d")
        with pytest.raises(ControlError, match="unknown command 'frobnicate'"):
            await ask(sock, "frobnicate")
        nursery.cancel_scope.cancel()


def test_an_op_is_registered_once() -> None:
    ops = ControlOps()
    ops.add({"create": Service().op_create})
    with pytest.raises(ValueError, match="registered twice"):
        ops.add({"create": Service().op_create})
    assert ops.names() == ["create"]
