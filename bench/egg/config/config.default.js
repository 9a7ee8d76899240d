'use strict';

const path = require('path');

// Egg's defaults, except where the files go: the harness gives every cluster
// its own directory (BENCH_EGG_DIR) so runs do not share logs or run files
// and nothing is written into the source tree.
module.exports = appInfo => {
  const dir = process.env.BENCH_EGG_DIR || path.join(appInfo.baseDir, 'run');
  return {
    keys: 'clutch-bench-not-a-secret',
    rundir: path.join(dir, 'run'),
    logger: {
      dir: path.join(dir, 'logs'),
    },
  };
};
