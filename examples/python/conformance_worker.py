"""The Python conformance worker: carries out any conformance scenario.

The conformance suite (tests/conformance/) launches this program as an app
worker. A controller agent drives it through the messenger itself:

* commands arrive as messages with action ``conformance.command``;
* everything this worker observes (messages on the actions it watches,
  egg-ready, egg-pids, agent-start, the outcome of each send, fire-and-forget
  failures, the shutdown notice) goes back to the agent as messages with
  action ``conformance.event``, in the order it happened.

The protocol is described in tests/conformance/README.md; the Rust, Node and
Go conformance workers speak it too.

Environment, besides the master's ``CLUTCH_*``:

``CONFORMANCE_ACTIONS``       comma-separated actions to report (``on``)
``CONFORMANCE_MANUAL_READY``  ``1``: call ``ready()`` only on the ``ready`` command
"""

import asyncio
import os
import sys

import clutch_messenger as clutch

COMMAND = "conformance.command"
EVENT = "conformance.event"


def message_event(msg: clutch.Message, handler: str) -> dict:
    try:
        data = msg.data
    except clutch.DecodeError as e:
        data = {"decode_error": str(e), "raw": msg.raw.decode("utf-8", "replace")}
    return {
        "event": "message",
        "handler": handler,
        "action": msg.action,
        "data": data,
        "from_role": msg.origin.role,
        "from_pid": msg.origin.pid,
        "from_worker_id": msg.origin.worker_id,
    }


def error_event(cmd_id, err: Exception) -> dict:
    code = getattr(err, "code", None)
    return {
        "event": "sent",
        "id": cmd_id,
        "ok": False,
        # The canonical gRPC number, from the library's own exception.
        "code": code.value[0] if code is not None else None,
        "code_name": code.name if code is not None else type(err).__name__,
        "error_type": type(err).__name__,
        "message": str(err),
    }


async def main() -> None:
    m = await clutch.connect(expect_role="app")
    reports: asyncio.Queue = asyncio.Queue()  # unbounded: a test program
    report = reports.put_nowait

    def watch(action: str, handler_kind: str = "on") -> None:
        register = m.on if handler_kind == "on" else m.once
        register(action, lambda msg: report(message_event(msg, handler_kind)))

    # Handlers first, before ready(): nothing the master sends is missed.
    for action in filter(None, (a.strip() for a in os.environ.get("CONFORMANCE_ACTIONS", "").split(","))):
        watch(action)
    m.on(clutch.EGG_READY, lambda _: report({"event": "egg-ready"}))
    m.on(clutch.EGG_PIDS, lambda msg: report({"event": "egg-pids", "pids": msg.data}))
    m.on(clutch.AGENT_START, lambda _: report({"event": "agent-start"}))
    m.on_undelivered(
        lambda r: report(
            {
                "event": "undelivered",
                "action": r.action,
                "codes": [u.code.value[0] for u in r.undelivered],
                "messages": [u.message for u in r.undelivered],
                "delivered": r.delivered,
                "held": r.held,
            }
        )
    )
    commands: asyncio.Queue = asyncio.Queue()
    m.on(COMMAND, lambda msg: commands.put_nowait(msg.data))

    async def on_shutdown() -> None:
        # Awaited, so the agent has it before this process exits.
        await m.send_to_agent(EVENT, {"event": "shutdown", "grace_ms": m.shutdown_grace_ms})

    m.on_shutdown(on_shutdown)

    ident = m.identity
    report(
        {
            "event": "hello",
            "lang": "python",
            "role": ident.role,
            "worker_id": ident.worker_id,
            "pid": ident.pid,
            "master_pid": ident.master_pid,
            "workers": ident.workers,
            "incarnation": ident.incarnation,
        }
    )

    async def reporter() -> None:
        # Numbered, so that the controller can drop a report that the master
        # re-delivered to a restarted agent (at-least-once across an agent's
        # incarnations, with acks).
        n = 0
        while True:
            event = await reports.get()
            n += 1
            event["n"] = n
            await m.emit("agent", EVENT, event)

    async def send(cmd: dict) -> None:
        cmd_id = cmd.get("id")
        route = cmd["route"]
        action = cmd["action"]
        count = int(cmd.get("count", 1))
        confirm = cmd.get("confirm", True)
        raw = cmd["raw"].encode("utf-8") if cmd.get("raw") is not None else None
        target = int(cmd["pid"]) if route == "pid" else route
        calls = {
            "broadcast": m.broadcast,
            "apps": m.send_to_app,
            "agent": m.send_to_agent,
            "random": m.send_random,
        }
        for i in range(count):
            data = {"seq": i, "data": cmd.get("data")} if cmd.get("seq") else cmd.get("data")
            if not confirm:
                try:
                    await m.emit(target, action, data, raw=raw)
                except clutch.SendError as e:
                    report(error_event(cmd_id, e))
                    return
                continue
            try:
                if raw is not None:
                    receipt = await m.send(target, action, raw=raw)
                elif route == "pid":
                    receipt = await m.send_to(target, action, data)
                else:
                    receipt = await calls[route](action, data)
            except clutch.SendError as e:
                report(error_event(cmd_id, e))
                continue
            report({"event": "sent", "id": cmd_id, "ok": True, "delivered": receipt.delivered, "held": receipt.held})
        if not confirm:
            report({"event": "sent", "id": cmd_id, "ok": True, "count": count})

    async def execute(cmd: dict) -> None:
        op = cmd.get("op")
        if op == "ready":
            await m.ready()
            report({"event": "ready-sent", "id": cmd.get("id")})
        elif op == "send":
            await send(cmd)
        elif op in ("on", "once"):
            watch(cmd["action"], op)
            report({"event": "subscribed", "id": cmd.get("id"), "action": cmd["action"], "handler": op})
        elif op == "tally":
            tally(cmd["action"])
            report({"event": "subscribed", "id": cmd.get("id"), "action": cmd["action"], "handler": "tally"})
        elif op == "tally-report":
            t = tallies.get(cmd["action"], {"count": 0, "in_order": True, "first_out_of_order": None})
            report({"event": "tally", "id": cmd.get("id"), "action": cmd["action"], **t})
        elif op == "connect":
            # A second registration, expected to be refused: the code comes
            # from the library's ConnectError.
            secret = os.environ["CLUTCH_SECRET"] if cmd.get("secret") == "own" else cmd.get("secret", "")
            try:
                other = await clutch.connect(secret=secret, role=cmd.get("role", "app"), exit_on_disconnect=False)
            except clutch.ConnectError as e:
                report(
                    {
                        "event": "connect",
                        "id": cmd.get("id"),
                        "ok": False,
                        "code": e.code.value[0] if e.code is not None else None,
                        "code_name": e.code.name if e.code is not None else None,
                        "message": str(e),
                    }
                )
            else:
                await other.close()
                report({"event": "connect", "id": cmd.get("id"), "ok": True})
        elif op == "state":
            ident = m.identity
            report(
                {
                    "event": "state",
                    "id": cmd.get("id"),
                    "egg_ready": m.is_egg_ready,
                    "egg_pids": m.egg_pids,
                    "role": ident.role,
                    "worker_id": ident.worker_id,
                    "pid": ident.pid,
                    "master_pid": ident.master_pid,
                    "workers": ident.workers,
                    "incarnation": ident.incarnation,
                }
            )
        elif op == "exit":
            sys.stdout.flush()
            os._exit(int(cmd.get("code", 0)))
        else:
            report({"event": "error", "id": cmd.get("id"), "message": f"unknown op {op!r}"})

    tallies: dict = {}

    def tally(action: str) -> None:
        t = tallies.setdefault(action, {"count": 0, "in_order": True, "first_out_of_order": None})

        def count(msg: clutch.Message) -> None:
            data = msg.data
            seq = data.get("seq") if isinstance(data, dict) else None
            if seq != t["count"] and t["in_order"]:
                t["in_order"] = False
                t["first_out_of_order"] = {"index": t["count"], "data": data}
            t["count"] += 1

        m.on(action, count)

    async def executor() -> None:
        while True:
            cmd = await commands.get()
            try:
                await execute(cmd)
            except Exception as e:  # noqa: BLE001 - reported to the controller
                report({"event": "error", "id": cmd.get("id") if isinstance(cmd, dict) else None, "message": repr(e)})

    tasks = [asyncio.ensure_future(reporter()), asyncio.ensure_future(executor())]
    if os.environ.get("CONFORMANCE_MANUAL_READY", "").strip() != "1":
        await m.ready()
    # The library exits the process at shutdown or when the master goes.
    await m.closed()
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    asyncio.run(main())
