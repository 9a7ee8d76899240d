'use strict';

// Starts a real Egg cluster (egg-cluster's master in this process, one agent,
// BENCH_WORKERS app workers) for Clutch's side-by-side benchmark. The harness
// (bench/harness) spawns `node launcher.js` and talks to the agent and the
// app workers over the side channel in lib/bench.js; this process is Egg's
// master and is measured as such (RSS, CPU).
//
// Environment: BENCH_WORKERS (app workers), BENCH_PORT (HTTP port the app
// workers share; the harness picks a free one), BENCH_EGG_DIR (where Egg puts
// its logs and run files), BENCH_CONTROL (host:port of the harness).

const egg = require('egg');

const workers = Number(process.env.BENCH_WORKERS || 2);
const port = Number(process.env.BENCH_PORT || 0);
if (!port) {
  console.error('launcher: BENCH_PORT is not set');
  process.exit(2);
}

egg.startCluster({
  baseDir: __dirname,
  workers,
  port,
  env: process.env.EGG_SERVER_ENV || 'prod',
});
