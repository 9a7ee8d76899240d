'use strict';

// JSON for Clutch payloads, without silently rounding large integers.
//
// JavaScript numbers are doubles: JSON.parse turns 9007199254740993 (2^53+1),
// a perfectly good u64 sent by a Rust or Go process, into 9007199254740992.
// Here an integer literal outside Number.MAX_SAFE_INTEGER is read as a
// BigInt instead, and a BigInt is written back as a plain JSON integer, so
// such values survive a round trip through a Node worker. Everything else is
// exactly JSON.parse / JSON.stringify.

const crypto = require('node:crypto');

const LONG_DIGITS = /\d{16,}/; // a safe integer has at most 16 digits
// A JSON string (skipped) or a number literal.
const TOKENS = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
const MAX = BigInt(Number.MAX_SAFE_INTEGER);
const MIN = -MAX;

function marker() {
  return `@clutch-bigint-${crypto.randomBytes(12).toString('hex')}:`;
}

/** Parses JSON text; unsafe integers become BigInt. Throws SyntaxError. */
function parse(text) {
  if (!LONG_DIGITS.test(text)) return JSON.parse(text);
  const tag = marker();
  let found = false;
  const marked = text.replace(TOKENS, (token) => {
    if (token[0] === '"' || /[.eE]/.test(token)) return token;
    const n = BigInt(token);
    if (n >= MIN && n <= MAX) return token;
    found = true;
    return `"${tag}${token}"`;
  });
  if (!found) return JSON.parse(text);
  return JSON.parse(marked, (key, value) =>
    typeof value === 'string' && value.startsWith(tag) ? BigInt(value.slice(tag.length)) : value,
  );
}

/** Encodes a value as JSON text; BigInt becomes a JSON integer and
 * `undefined` becomes `null`. Throws TypeError for what JSON cannot hold. */
function stringify(value) {
  if (value === undefined) return 'null';
  let text;
  try {
    text = JSON.stringify(value);
  } catch (e) {
    if (!(e instanceof TypeError) || !/BigInt/i.test(e.message)) throw e;
    const tag = marker();
    text = JSON.stringify(value, (key, v) => (typeof v === 'bigint' ? `${tag}${v}` : v)).replace(
      new RegExp(`"${tag}(-?\\d+)"`, 'g'),
      '$1',
    );
  }
  return text === undefined ? 'null' : text;
}

module.exports = { parse, stringify };
