/**
 * The generated messages and services (src/gen) are those of this
 * repository's proto files: generated again, offline, by the package's own
 * buf and protoc-gen-es, they are the same bytes. After a proto change,
 * `npm run generate`.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const PKG = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .sort();
}

test("src/gen is what the proto files generate", () => {
  const out = mkdtempSync(join(tmpdir(), "mayfly-gen-"));
  execFileSync(
    join(PKG, "node_modules", ".bin", "buf"),
    ["generate", join(PKG, "..", "..", "proto"), "--template", "buf.gen.yaml", "--output", out],
    {
      cwd: PKG,
      stdio: ["ignore", "ignore", "inherit"],
      // buf runs the protoc-gen-es plugin it finds on the PATH.
      env: { ...process.env, PATH: `${join(PKG, "node_modules", ".bin")}:${process.env.PATH}` },
    },
  );
  const fresh = join(out, "src", "gen");
  const committed = join(PKG, "src", "gen");
  assert.deepEqual(files(committed), files(fresh), "the same files; run `npm run generate`");
  for (const f of files(fresh)) {
    assert.equal(
      readFileSync(join(committed, f), "utf8"),
      readFileSync(join(fresh, f), "utf8"),
      `${f} is stale; run \`npm run generate\``,
    );
  }
});
