"""A Python client for the Clutch master: Egg.js's messenger over gRPC.

A child process that the master launched (the agent or an app worker)
connects with :func:`connect`, which reads the ``CLUTCH_*`` environment,
opens the ``Messenger.Attach`` stream and registers. The returned
:class:`Messenger` has the face of Egg's messenger and of the Rust SDKs::

    import asyncio
    import clutch_messenger as clutch

    async def main():
        m = await clutch.connect()
        m.on("ping", lambda msg: print("ping", msg.data))
        await m.ready()
        await m.egg_ready()                    # every process is up
        await m.send_to_agent("pong", {"worker": m.identity.worker_id})
        await m.closed()                       # exits when the master goes

    asyncio.run(main())

Behaviour (the same in every Clutch SDK):

* Handlers run one at a time, in arrival order, on the event loop. A handler
  may be a coroutine function: it is then started as a task, in order.
* ``egg-ready``, ``egg-pids`` (data: a list of pids) and ``agent-start``
  also reach ``on`` handlers under those action names, as in Egg.
* Messages that arrive before :meth:`Messenger.ready` with no handler yet are
  kept until a handler for their action is registered.
* ``broadcast``, ``send_to_app``, ``send_to_agent``, ``send_random`` and
  ``send_to`` wait for the master's account and raise
  :class:`UndeliveredError` (``err.code`` is a :class:`grpc.StatusCode`,
  e.g. ``NOT_FOUND`` for a pid nobody has). :meth:`Messenger.emit` is the
  fire-and-forget variant; its failures go to
  :meth:`Messenger.on_undelivered`.
* Data is JSON: any value :func:`json.dumps` accepts; received data is
  decoded on first access of :attr:`Message.data` (empty bytes read as
  ``None``).
* On the master's shutdown notice the shutdown hooks run, then the process
  exits with code 0; if the stream to the master breaks without a notice,
  it exits with code 1 (both unless ``exit_on_disconnect=False``).
* Handled messages are acknowledged (``Register.acks``), so the master can
  re-deliver what a crashed process had not handled to its successor.

The generated stubs (``clutch.v1.messenger_pb2`` and ``..._pb2_grpc``) must
be importable: see README.md for the one ``grpc_tools.protoc`` command.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Union

import grpc
import grpc.aio

try:
    from clutch.v1 import messenger_pb2 as pb
    from clutch.v1 import messenger_pb2_grpc as pb_grpc
except ImportError as _e:  # pragma: no cover - a setup problem, explained
    raise ImportError(
        "clutch_messenger: the generated gRPC stubs (clutch.v1.messenger_pb2) "
        "are not importable. Generate them from proto/ with\n"
        "  python3 -m grpc_tools.protoc -I proto --python_out=GEN "
        "--grpc_python_out=GEN proto/clutch/v1/messenger.proto\n"
        "and put GEN on PYTHONPATH (see examples/python/README.md)."
    ) from _e

__all__ = [
    "AGENT_START",
    "EGG_PIDS",
    "EGG_READY",
    "ClutchError",
    "ConnectError",
    "DecodeError",
    "DisconnectedError",
    "EncodeError",
    "Identity",
    "Message",
    "Messenger",
    "Origin",
    "Receipt",
    "SendError",
    "SendResult",
    "Undelivered",
    "UndeliveredError",
    "connect",
]

log = logging.getLogger("clutch_messenger")

#: The action name under which ``egg-ready`` reaches ``on`` handlers.
EGG_READY = "egg-ready"
#: The action name under which ``egg-pids`` reaches ``on`` handlers.
EGG_PIDS = "egg-pids"
#: The action name under which ``agent-start`` reaches ``on`` handlers.
AGENT_START = "agent-start"

# Handled messages after which an ack goes out even if more are waiting.
_ACK_EVERY = 64
# Messages without a handler kept before ready(); past this the oldest go.
_EARLY_BUFFER = 4096
# Frames read from the master but not dispatched yet. A full inbox stops
# the reader, and HTTP/2 flow control then slows the master's delivery.
_INBOX = 256

_ROLE_NAMES = {pb.ROLE_AGENT: "agent", pb.ROLE_APP: "app", pb.ROLE_MASTER: "master"}
_ROLES = {"agent": pb.ROLE_AGENT, "app": pb.ROLE_APP}
_ROUTES = {
    "broadcast": pb.ROUTE_BROADCAST,
    "apps": pb.ROUTE_APPS,
    "agent": pb.ROUTE_AGENT,
    "random": pb.ROUTE_RANDOM,
}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

#: Where a send goes: ``"broadcast"``, ``"apps"``, ``"agent"``, ``"random"``,
#: or an ``int`` pid (Egg's ``sendTo``).
Target = Union[str, int]


# ---- errors -----------------------------------------------------------------


class ClutchError(Exception):
    """Base class of every error this module raises."""


class ConnectError(ClutchError):
    """Connecting or registering failed.

    ``code`` is the :class:`grpc.StatusCode` when the master refused the
    registration (UNAUTHENTICATED, PERMISSION_DENIED, ALREADY_EXISTS,
    INVALID_ARGUMENT) or could not be reached (UNAVAILABLE), else ``None``.
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


class SendError(ClutchError):
    """A send failed."""

    #: The gRPC code of the (first) failure, if the master reported one.
    code: Optional[grpc.StatusCode] = None


class EncodeError(SendError, ValueError):
    """The data cannot be encoded as JSON."""


class DisconnectedError(SendError):
    """The stream to the master is closed."""


@dataclass(frozen=True)
class Undelivered:
    """One target a send did not reach."""

    #: Why: NOT_FOUND (no such pid), UNAVAILABLE (no ready app worker for a
    #: random send), RESOURCE_EXHAUSTED (mailbox full), INVALID_ARGUMENT.
    code: grpc.StatusCode
    #: The master's sentence about it.
    message: str
    #: The target's pid, when there is one (else 0).
    pid: int
    #: The target's worker id when it is an app worker, else 0.
    worker_id: int
    #: ``"agent"``, ``"app"``, or ``None`` when unknown.
    role: Optional[str]


class UndeliveredError(SendError):
    """At least one target did not get the message (see ``failures``)."""

    def __init__(self, action: str, delivered: int, held: int, failures: List[Undelivered]):
        reasons = "; ".join(f"{f.code.name}: {f.message}" for f in failures)
        super().__init__(f"{action!r} did not reach {len(failures)} target(s): {reasons}")
        self.action = action
        self.delivered = delivered
        self.held = held
        self.failures = failures
        self.code = failures[0].code if failures else None


class DecodeError(ClutchError, ValueError):
    """A message's data is not valid UTF-8 JSON."""


# ---- values -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who this process is, as the master sees it (its welcome)."""

    role: str  #: ``"agent"`` or ``"app"``
    worker_id: int  #: the app worker's slot 1..N; 0 for the agent
    pid: int  #: the pid ``send_to`` uses for this process
    master_pid: int
    workers: int  #: N, the number of app workers
    incarnation: int  #: how many processes have held this slot, this one included


@dataclass(frozen=True)
class Origin:
    """Who sent a message."""

    role: str  #: ``"agent"``, ``"app"`` or ``"master"``
    pid: int
    worker_id: int  #: the sender's slot when it is an app worker, else 0


@dataclass(frozen=True)
class Receipt:
    """What the master did with a send that reached every target."""

    delivered: int  #: processes it was handed to
    held: int  #: processes it is held for until they register


@dataclass(frozen=True)
class SendResult:
    """The master's account of a fire-and-forget send that missed a target."""

    id: int
    action: str
    delivered: int
    held: int
    undelivered: List[Undelivered]


class Message:
    """A message delivered to this process."""

    __slots__ = ("action", "raw", "origin", "_data")

    def __init__(self, action: str, raw: bytes, origin: Origin):
        #: The action name.
        self.action = action
        #: The payload exactly as sent (UTF-8 JSON by convention).
        self.raw = raw
        #: The sender.
        self.origin = origin
        self._data: Any = _UNSET

    @property
    def data(self) -> Any:
        """The payload decoded from JSON (empty bytes read as ``None``).

        Raises :class:`DecodeError` if it is not UTF-8 JSON.
        """
        if self._data is _UNSET:
            if not self.raw:
                self._data = None
            else:
                try:
                    self._data = json.loads(self.raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise DecodeError(f"cannot decode the data of {self.action!r}: {e}") from e
        return self._data

    def __repr__(self) -> str:
        return f"Message(action={self.action!r}, raw={self.raw[:80]!r}, origin={self.origin!r})"


_UNSET = object()

Handler = Callable[[Message], Any]


def _encode(action: str, data: Any) -> bytes:
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise EncodeError(f"cannot encode the data of {action!r} as JSON: {e}") from e


def _undelivered(u: Any) -> Undelivered:
    return Undelivered(
        code=_STATUS_BY_NUMBER.get(u.code, grpc.StatusCode.UNKNOWN),
        message=u.message,
        pid=u.pid,
        worker_id=u.worker_id,
        role=_ROLE_NAMES.get(u.role),
    )


def _exit(code: int) -> None:
    """Ends the process the way the Rust SDK does, after flushing output."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - nothing more to do at exit
            pass
    os._exit(code)


# ---- the messenger ---------------------------------------------------------------


class Messenger:
    """One child's attachment to the master. Create it with :func:`connect`."""

    def __init__(self) -> None:  # use connect()
        self.identity: Identity
        self._out: asyncio.Queue = asyncio.Queue()
        self._call: Any = None
        self._channel: Optional[grpc.aio.Channel] = None
        self._ids = itertools.count(1)
        self._pending: Dict[int, asyncio.Future] = {}
        self._handlers: Dict[str, List[List[Any]]] = {}
        self._early: Deque[Message] = collections.deque()
        self._buffering = True
        self._replay: List[str] = []
        self._changed = asyncio.Event()
        self._inbox: asyncio.Queue = asyncio.Queue(_INBOX)
        self._ready_sent = False
        self._egg_ready = asyncio.Event()
        self._egg_pids: List[int] = []
        self._closed = asyncio.Event()  # the stream has ended
        self._released = asyncio.Event()  # closed() may return
        self._shutdown = asyncio.Event()
        self._grace_ms: Optional[int] = None
        self._shutdown_hooks: List[Callable[[], Any]] = []
        self._on_undelivered: Optional[Callable[[SendResult], Any]] = None
        self._exit_on_disconnect = True
        self._tasks: List[asyncio.Task] = []
        self._handled = 0
        self._acked = 0

    # -- handlers ------------------------------------------------------------------

    def on(self, action: str, handler: Handler) -> "Messenger":
        """Calls ``handler(message)`` for every message with this action."""
        self._subscribe(action, handler, once=False)
        return self

    def once(self, action: str, handler: Handler) -> "Messenger":
        """Calls ``handler(message)`` for the next message with this action only."""
        self._subscribe(action, handler, once=True)
        return self

    def on_undelivered(self, handler: Callable[[SendResult], Any]) -> None:
        """Replaces the default handling (a logged warning) of fire-and-forget
        sends that missed a target."""
        self._on_undelivered = handler

    def on_shutdown(self, hook: Callable[[], Any]) -> None:
        """Runs ``hook()`` (a function or coroutine function) at the master's
        shutdown notice, before the process exits with code 0. Messages are
        still dispatched meanwhile; :attr:`shutdown_grace_ms` tells how long
        the hooks have before the master sends SIGTERM."""
        self._shutdown_hooks.append(hook)

    def _subscribe(self, action: str, handler: Handler, once: bool) -> None:
        if not callable(handler):
            raise TypeError("handler must be callable")
        # [handler, once, spent]; spent once-handlers are removed on dispatch.
        self._handlers.setdefault(action, []).append([handler, once, False])
        # Messages kept for this action are replayed by the dispatcher before
        # it takes the next frame, so their order is kept.
        self._replay.append(action)
        self._changed.set()

    # -- lifecycle ---------------------------------------------------------------------

    async def ready(self) -> None:
        """Tells the master this process is ready (Egg's app-start /
        agent-start). Idempotent."""
        if self._ready_sent:
            return
        self._ready_sent = True
        self._replay.append(_STOP_BUFFERING)
        self._changed.set()
        await self._frame(pb.ClientFrame(ready=pb.Ready()))

    async def egg_ready(self) -> None:
        """Waits for ``egg-ready``: every process of the cluster is ready.

        Raises :class:`DisconnectedError` if the stream ends first."""
        if self._egg_ready.is_set():
            return
        await self._first(self._egg_ready)
        if not self._egg_ready.is_set():
            raise DisconnectedError("the connection to the master closed before egg-ready")

    @property
    def is_egg_ready(self) -> bool:
        """True once ``egg-ready`` has arrived."""
        return self._egg_ready.is_set()

    @property
    def egg_pids(self) -> List[int]:
        """The pids from the last ``egg-pids``."""
        return list(self._egg_pids)

    @property
    def shutdown_grace_ms(self) -> Optional[int]:
        """Milliseconds announced by the master's shutdown notice, once it came."""
        return self._grace_ms

    async def shutdown_notice(self) -> Optional[int]:
        """Waits for the shutdown notice and returns its grace period in
        milliseconds, or ``None`` if the stream ended without one."""
        await self._first(self._shutdown)
        return self._grace_ms

    async def closed(self) -> None:
        """Waits until the stream to the master has ended.

        By default the library ends the process itself then (code 1, or code
        0 once the shutdown hooks have run), and this never returns: a main
        that awaits it cannot end the process early with code 0. With
        ``exit_on_disconnect=False`` it returns when the stream ends."""
        await self._released.wait()

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    async def close(self) -> None:
        """Ends the stream from this side (only useful with
        ``exit_on_disconnect=False``)."""
        self._exit_on_disconnect = False
        if self._call is not None:
            self._call.cancel()
        await self._closed.wait()
        self._released.set()
        if self._channel is not None:
            await self._channel.close()

    async def _first(self, event: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._closed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- sends ---------------------------------------------------------------------------

    async def broadcast(self, action: str, data: Any = None) -> Receipt:
        """Egg's ``broadcast``: the agent and every app worker, this process included."""
        return await self.send("broadcast", action, data)

    async def send_to_app(self, action: str, data: Any = None) -> Receipt:
        """Egg's ``sendToApp``: every app worker (this one too, if it is an app)."""
        return await self.send("apps", action, data)

    async def send_to_agent(self, action: str, data: Any = None) -> Receipt:
        """Egg's ``sendToAgent``: the agent."""
        return await self.send("agent", action, data)

    async def send_random(self, action: str, data: Any = None) -> Receipt:
        """Egg's ``sendRandom``: from the agent, one ready app worker that the
        master picks (UNAVAILABLE if none is ready); from an app, the agent."""
        return await self.send("random", action, data)

    async def send_to(self, pid: int, action: str, data: Any = None) -> Receipt:
        """Egg's ``sendTo(pid)``: the one process with this pid. An unknown
        pid raises :class:`UndeliveredError` with code ``NOT_FOUND``."""
        return await self.send(pid, action, data)

    async def send(self, target: Target, action: str, data: Any = None, *, raw: Optional[bytes] = None) -> Receipt:
        """Sends ``data`` as JSON (or the bytes ``raw`` as they are) and waits
        for the master's account of it. Raises :class:`UndeliveredError` if a
        target was missed, :class:`DisconnectedError` if the stream is gone."""
        payload = raw if raw is not None else _encode(action, data)
        send_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[send_id] = future
        try:
            await self._frame(_send_frame(send_id, target, action, payload, want_result=True))
            result = await future
        finally:
            self._pending.pop(send_id, None)
        if result.undelivered:
            raise UndeliveredError(action, result.delivered, result.held, [_undelivered(u) for u in result.undelivered])
        return Receipt(delivered=result.delivered, held=result.held)

    async def emit(self, target: Target, action: str, data: Any = None, *, raw: Optional[bytes] = None) -> None:
        """Sends without waiting for the master's account: the fast path for
        streams of messages. A missed target is reported to the
        :meth:`on_undelivered` handler."""
        payload = raw if raw is not None else _encode(action, data)
        await self._frame(_send_frame(next(self._ids), target, action, payload, want_result=False))

    async def _frame(self, frame: Any) -> None:
        """Queues a frame for the master; waits while the queue is full."""
        if self._closed.is_set():
            raise DisconnectedError("the connection to the master is closed")
        try:
            self._out.put_nowait(frame)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(self._out.put(frame))
        closed = asyncio.ensure_future(self._closed.wait())
        await asyncio.wait([put, closed], return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not put.done():
            put.cancel()
            raise DisconnectedError("the connection to the master is closed")

    # -- internals -------------------------------------------------------------------------

    async def _requests(self):
        """The request stream: frames in the order they were queued."""
        while True:
            frame = await self._out.get()
            if frame is None:
                return
            yield frame

    async def _read(self) -> None:
        """Moves frames from the stream to the bounded inbox."""
        error: Optional[BaseException] = None
        try:
            while True:
                frame = await self._call.read()
                if frame is grpc.aio.EOF:
                    break
                await self._inbox.put(frame)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = None
        await self._inbox.put(_End(error))

    async def _dispatch(self) -> None:
        end: Optional[_End] = None
        try:
            while True:
                self._apply()
                if self._inbox.empty():
                    self._flush_ack(caught_up=True)
                    getter = asyncio.ensure_future(self._inbox.get())
                    changed = asyncio.ensure_future(self._changed.wait())
                    await asyncio.wait([getter, changed], return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    if not getter.done():
                        getter.cancel()
                        try:
                            await getter
                        except asyncio.CancelledError:
                            pass
                    if getter.cancelled():
                        continue
                    frame = getter.result()
                else:
                    frame = self._inbox.get_nowait()
                    self._flush_ack(caught_up=False)
                if isinstance(frame, _End):
                    end = frame
                    break
                try:
                    self._handle(frame)
                except Exception:  # noqa: BLE001 - a bad frame must not stop dispatch
                    log.exception("cannot handle a frame from the master")
        finally:
            self._on_closed(end.error if end else None)

    def _apply(self) -> None:
        """Applies handler-table changes made since the last frame."""
        self._changed.clear()
        while self._replay:
            action = self._replay.pop(0)
            if action is _STOP_BUFFERING:
                self._buffering = False
                if self._early:
                    log.debug("dropping %d message(s) that no handler subscribed to before ready()", len(self._early))
                    self._early.clear()
                continue
            matching = [m for m in self._early if m.action == action]
            if matching:
                self._early = collections.deque(m for m in self._early if m.action != action)
                for message in matching:
                    self._deliver(message)

    def _handle(self, frame: Any) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "message":
            m = frame.message
            origin = Origin(_ROLE_NAMES.get(m.from_role, "unknown"), m.from_pid, m.from_worker_id)
            self._deliver(Message(m.action, bytes(m.data), origin))
            self._handled = max(self._handled, m.seq)
        elif kind == "egg_ready":
            self._egg_ready.set()
            self._deliver(self._synthetic(EGG_READY, b"null"))
        elif kind == "egg_pids":
            self._egg_pids = list(frame.egg_pids.pids)
            self._deliver(self._synthetic(EGG_PIDS, json.dumps(self._egg_pids).encode()))
        elif kind == "agent_start":
            self._deliver(self._synthetic(AGENT_START, b"null"))
        elif kind == "send_result":
            self._send_result(frame.send_result)
        elif kind == "shutdown":
            self._grace_ms = frame.shutdown.grace_ms
            self._shutdown.set()
            hooks, self._shutdown_hooks = self._shutdown_hooks, []
            self._tasks.append(asyncio.ensure_future(self._run_shutdown_hooks(hooks)))
        elif kind == "welcome":
            log.warning("ignoring a second welcome from the master")

    def _synthetic(self, action: str, raw: bytes) -> Message:
        return Message(action, raw, Origin("master", self.identity.master_pid, 0))

    def _deliver(self, message: Message) -> None:
        handlers = self._handlers.get(message.action)
        if not handlers:
            if self._buffering:
                if len(self._early) >= _EARLY_BUFFER:
                    log.warning("no handler before ready(): early-message buffer full, dropping the oldest (%s)", message.action)
                    self._early.popleft()
                self._early.append(message)
            else:
                log.debug("no handler for %r; message ignored", message.action)
            return
        for entry in list(handlers):
            handler, once, spent = entry
            if spent:
                continue
            if once:
                entry[2] = True
                handlers.remove(entry)
            self._call_handler(handler, message)

    def _call_handler(self, handler: Callable[..., Any], arg: Any) -> None:
        try:
            result = handler(arg)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                task.add_done_callback(_log_task_failure)
        except Exception:  # noqa: BLE001 - a handler bug must not stop dispatch
            log.exception("a handler for %r raised; dispatch goes on", getattr(arg, "action", arg))

    def _send_result(self, r: Any) -> None:
        future = self._pending.get(r.id)
        if future is not None:
            if not future.done():
                future.set_result(r)
            return
        if not r.undelivered:
            return
        result = SendResult(r.id, r.action, r.delivered, r.held, [_undelivered(u) for u in r.undelivered])
        if self._on_undelivered is not None:
            self._call_handler(self._on_undelivered, result)
        else:
            reasons = "; ".join(f"{u.code.name}: {u.message}" for u in result.undelivered)
            log.warning("%r did not reach every target: %s", result.action, reasons)

    def _flush_ack(self, caught_up: bool) -> None:
        behind = self._handled - self._acked
        if behind > 0 and (caught_up or behind >= _ACK_EVERY):
            try:
                self._out.put_nowait(pb.ClientFrame(ack=pb.Ack(seq=self._handled)))
                self._acked = self._handled
            except asyncio.QueueFull:
                pass  # a later ack covers these

    async def _run_shutdown_hooks(self, hooks: List[Callable[[], Any]]) -> None:
        for hook in hooks:
            try:
                result = hook()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001
                log.exception("a shutdown hook raised")
        if self._exit_on_disconnect:
            log.info("the master is stopping the cluster; exiting")
            _exit(0)

    def _on_closed(self, error: Optional[BaseException]) -> None:
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DisconnectedError("the connection to the master closed"))
        self._pending.clear()
        if not self._exit_on_disconnect:
            self._released.set()
            return
        if self._shutdown.is_set():
            # The hooks are still running; the master's SIGTERM ends them if
            # they overrun.
            log.info("the master closed the stream during shutdown")
            return
        log.error("lost the connection to the master (%s); exiting", error or "stream ended")
        _exit(1)


class _End:
    """Marks the end of the inbound stream."""

    __slots__ = ("error",)

    def __init__(self, error: Optional[BaseException]):
        self.error = error


_STOP_BUFFERING = object()


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("an async handler raised", exc_info=task.exception())


def _send_frame(send_id: int, target: Target, action: str, data: bytes, want_result: bool) -> Any:
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be a route name or an int pid, not {target!r}")
    if isinstance(target, int):
        route, pid = pb.ROUTE_PID, target
    else:
        try:
            route, pid = _ROUTES[target], 0
        except KeyError:
            raise ValueError(f"unknown target {target!r}: expected one of {sorted(_ROUTES)} or a pid") from None
    return pb.ClientFrame(
        send=pb.Send(id=send_id, route=route, pid=pid, action=action, data=data, want_result=want_result)
    )


def _env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConnectError(f"environment variable {name} is not set: is this process running under the Clutch master?")
    return value


async def connect(
    *,
    addr: Optional[str] = None,
    secret: Optional[str] = None,
    role: Optional[str] = None,
    expect_role: Optional[str] = None,
    acks: bool = True,
    exit_on_disconnect: bool = True,
    send_buffer: int = 1024,
    timeout: float = 10.0,
) -> Messenger:
    """Connects to the master and registers.

    ``addr``, ``secret`` and ``role`` default to ``CLUTCH_ADDR``,
    ``CLUTCH_SECRET`` and ``CLUTCH_ROLE``. With ``expect_role`` (``"agent"``
    or ``"app"``) a process launched in the other role is refused here, as
    the Rust SDK faces do. Raises :class:`ConnectError`.
    """
    addr = addr if addr is not None else _env("CLUTCH_ADDR")
    secret = secret if secret is not None else _env("CLUTCH_SECRET")
    role = role if role is not None else _env("CLUTCH_ROLE")
    if role not in _ROLES:
        raise ConnectError(f"CLUTCH_ROLE={role!r}: expected 'agent' or 'app'")
    if expect_role is not None and role != expect_role:
        raise ConnectError(f"this program is a {expect_role}, but the master launched it as {role}")

    m = Messenger()
    m._exit_on_disconnect = exit_on_disconnect
    m._out = asyncio.Queue(max(1, send_buffer))
    # No message size cap on receive: the master enforces its own limit.
    channel = grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", -1)])
    m._channel = channel
    stub = pb_grpc.MessengerStub(channel)
    # The master answers the call only after reading the register frame, so
    # it is queued before the call starts.
    m._out.put_nowait(pb.ClientFrame(register=pb.Register(secret=secret, role=_ROLES[role], acks=acks)))
    call = stub.Attach(m._requests(), wait_for_ready=True)
    m._call = call
    try:
        first = await asyncio.wait_for(call.read(), timeout)
    except asyncio.TimeoutError:
        call.cancel()
        await channel.close()
        raise ConnectError(f"no answer from the master at {addr} within {timeout} s", grpc.StatusCode.DEADLINE_EXCEEDED) from None
    except grpc.aio.AioRpcError as e:
        await channel.close()
        raise ConnectError(f"the master refused the registration ({e.code().name}): {e.details()}", e.code()) from None
    if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
        call.cancel()
        await channel.close()
        raise ConnectError("protocol error: the first frame from the master was not `welcome`")
    w = first.welcome
    m.identity = Identity(
        role=_ROLE_NAMES.get(w.role, role),
        worker_id=w.worker_id,
        pid=w.pid,
        master_pid=w.master_pid,
        workers=w.workers,
        incarnation=w.incarnation,
    )
    m._tasks = [asyncio.ensure_future(m._read()), asyncio.ensure_future(m._dispatch())]
    log.debug("registered with the master: %s", m.identity)
    return m
