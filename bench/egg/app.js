'use strict';

// Every Egg app worker: counts what the agent sends (fan-out), floods the
// agent on command (fan-in) and measures round trips (sendTo the agent's
// pid, which answers with sendTo this pid). See lib/bench.js.

const cluster = require('cluster');
const { attach } = require('./lib/bench');

module.exports = app => {
  const workerId = cluster.worker ? cluster.worker.id : Number(process.env.BENCH_WORKER_ID || 1);
  attach({ role: 'app', workerId, messenger: app.messenger });
};
