'use strict';

// An app worker in Node.js: the Egg idiom, app side.
//
// It answers every `ping` from the agent with a `pong` to the agent, the same
// protocol as the Rust example worker, so it runs with the Rust example agent
// (see README.md and cluster.example.toml).

const clutch = require('./lib/clutch');

async function main() {
  const worker = await clutch.connect({ expectRole: 'app' });
  const me = worker.identity.workerId;

  worker.on('ping', async ({ round }) => {
    console.log(`ping ${round}`);
    try {
      await worker.sendToAgent('pong', { round, worker: me });
    } catch (e) {
      console.warn(`pong not sent: ${e.message}`);
    }
  });
  worker.onShutdown(() => console.log('the master is stopping the cluster; bye'));

  await worker.ready();
  await worker.eggReady();
  console.log(`worker ${me} (pid ${worker.identity.pid}) is up; every process is ready`);
  // The library exits the process when the master closes the stream.
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
