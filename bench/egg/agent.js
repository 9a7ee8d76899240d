'use strict';

// The Egg agent: floods the app workers on command (fan-out), counts what
// they send (fan-in) and answers round-trip pings. See lib/bench.js.

const { attach } = require('./lib/bench');

module.exports = agent => {
  attach({ role: 'agent', workerId: 0, messenger: agent.messenger });
};
