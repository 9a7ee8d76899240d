"""An app worker in Python: the Egg idiom, app side.

It answers every ``ping`` from the agent with a ``pong`` to the agent, the
same protocol as the Rust example worker, so it runs with the Rust example
agent (see README.md and cluster.example.toml).
"""

import asyncio
import logging

import clutch_messenger as clutch

log = logging.getLogger("worker")


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    worker = await clutch.connect(expect_role="app")
    me = worker.identity.worker_id

    async def on_ping(msg: clutch.Message) -> None:
        round_ = msg.data["round"]
        log.info("ping %s", round_)
        try:
            await worker.send_to_agent("pong", {"round": round_, "worker": me})
        except clutch.SendError as e:
            log.warning("pong not sent: %s", e)

    worker.on("ping", on_ping)
    worker.on_shutdown(lambda: log.info("the master is stopping the cluster; bye"))

    await worker.ready()
    await worker.egg_ready()
    log.info("worker %d (pid %d) is up; every process is ready", me, worker.identity.pid)
    # The library exits the process when the master closes the stream.
    await worker.closed()


if __name__ == "__main__":
    asyncio.run(main())
