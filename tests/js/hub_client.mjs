// Drives @huggingface/hub against a node and writes one JSON object: for every call, its result (or the
// error it threw) and the requests it sent. Run by tests/test_js_clients.py, which compares the results with
// what the node's store holds. Settings come from the environment:
//   DEPOT_URL        the node, e.g. http://127.0.0.1:8980 (passed to every call as hubUrl)
//   DEPOT_REPO       a repo with config.json, model.safetensors (LFS), onnx/... on main, config.json on
//                    branch dev and on refs/pr/1
//   DEPOT_EMPTY_REPO a repo holding an empty file, empty.txt
//   DEPOT_MANY_REPO  a repo with more files in shard/ than one page of the tree lists (1000; 50 expanded)
//   DEPOT_CACHE_DIR  an empty folder for downloadFileToCacheDir and snapshotDownload
//   DEPOT_RESULT     the file to write the JSON to (stdout is the library's: it logs downloads there)
import { createHash } from "node:crypto";
import { readFile, readdir, realpath, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";

import {
  downloadFile,
  downloadFileToCacheDir,
  fileExists,
  listCommits,
  listFiles,
  listModels,
  modelInfo,
  pathsInfo,
  snapshotDownload,
} from "@huggingface/hub";

import { describeError, loggingFetch } from "./log_fetch.mjs";

const hubUrl = process.env.DEPOT_URL;
const repo = process.env.DEPOT_REPO;
const emptyRepo = process.env.DEPOT_EMPTY_REPO;
const manyRepo = process.env.DEPOT_MANY_REPO;
const cacheDir = process.env.DEPOT_CACHE_DIR;
const resultFile = process.env.DEPOT_RESULT;
if (!hubUrl || !repo || !emptyRepo || !manyRepo || !cacheDir || !resultFile) {
  throw new Error("set DEPOT_URL, DEPOT_REPO, DEPOT_EMPTY_REPO, DEPOT_MANY_REPO, DEPOT_CACHE_DIR and DEPOT_RESULT");
}

const requests = [];
globalThis.fetch = loggingFetch(globalThis.fetch, requests);

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

async function blobSummary(blob) {
  if (blob === null) return null;
  const bytes = new Uint8Array(await blob.arrayBuffer());
  return { size: blob.size, length: bytes.length, sha256: sha256(bytes), head: Buffer.from(bytes.subarray(0, 200)).toString("latin1") };
}

async function collect(iterator, max = 10_000) {
  const items = [];
  for await (const item of iterator) {
    items.push(item);
    if (items.length >= max) break;
  }
  return items;
}

async function walk(root, folder = root) {
  const files = {};
  for (const entry of await readdir(folder, { withFileTypes: true })) {
    const full = join(folder, entry.name);
    if (entry.isDirectory()) {
      Object.assign(files, await walk(root, full));
    } else {
      files[relative(root, full)] = sha256(await readFile(full));
    }
  }
  return files;
}

const results = {};

async function call(name, fn) {
  const first = requests.length;
  try {
    results[name] = { ok: true, value: await fn() };
  } catch (error) {
    results[name] = { ok: false, error: describeError(error) };
  }
  results[name].requests = requests.slice(first);
}

const entry = (m) => ({ ...m, updatedAt: Number.isNaN(m.updatedAt?.getTime()) ? null : m.updatedAt });

await call("listModels", async () =>
  (await collect(listModels({ hubUrl, additionalFields: ["sha"] }))).map(entry),
);
await call("listModels_owner", async () =>
  (await collect(listModels({ hubUrl, search: { owner: repo.split("/")[0] } }))).map((m) => m.name),
);
await call("listModels_limit", async () => (await collect(listModels({ hubUrl, limit: 1 }))).map((m) => m.name));

await call("modelInfo", async () => entry(await modelInfo({ hubUrl, name: repo, additionalFields: ["sha", "filePaths"] })));
await call("modelInfo_dev", async () =>
  entry(await modelInfo({ hubUrl, name: repo, revision: "dev", additionalFields: ["sha", "filePaths"] })),
);

await call("listFiles", () => collect(listFiles({ hubUrl, repo, recursive: true })));
await call("listFiles_top", () => collect(listFiles({ hubUrl, repo })));
await call("listFiles_folder", () => collect(listFiles({ hubUrl, repo, path: "onnx" })));
await call("listFiles_expand", () => collect(listFiles({ hubUrl, repo, recursive: true, expand: true })));

await call("listFiles_pages", async () =>
  (await collect(listFiles({ hubUrl, repo: manyRepo, recursive: true }))).map((e) => e.path),
);
await call("listFiles_pages_expand", async () =>
  (await collect(listFiles({ hubUrl, repo: manyRepo, path: "shard", expand: true }))).map((e) => e.path),
);

await call("fileExists_file", () => fileExists({ hubUrl, repo, path: "config.json" }));
await call("fileExists_lfs", () => fileExists({ hubUrl, repo, path: "model.safetensors" }));
await call("fileExists_nested", () => fileExists({ hubUrl, repo, path: "onnx/model_q4.onnx" }));
await call("fileExists_dev", () => fileExists({ hubUrl, repo, path: "config.json", revision: "dev" }));
await call("fileExists_missing", () => fileExists({ hubUrl, repo, path: "missing.bin" }));
await call("fileExists_missing_on_dev", () => fileExists({ hubUrl, repo, path: "model.safetensors", revision: "dev" }));
await call("fileExists_absent_repo", () => fileExists({ hubUrl, repo: "acme/absent", path: "config.json" }));

await call("pathsInfo", () =>
  pathsInfo({ hubUrl, repo, paths: ["config.json", "onnx", "missing.bin", "model.safetensors"] }),
);
await call("pathsInfo_expand", () =>
  pathsInfo({ hubUrl, repo, paths: ["config.json", "model.safetensors"], expand: true }),
);

await call("downloadFile_plain", async () => blobSummary(await downloadFile({ hubUrl, repo, path: "config.json" })));
await call("downloadFile_lfs", async () => blobSummary(await downloadFile({ hubUrl, repo, path: "model.safetensors" })));
await call("downloadFile_missing", async () => blobSummary(await downloadFile({ hubUrl, repo, path: "missing.bin" })));
await call("downloadFile_pr", async () =>
  blobSummary(await downloadFile({ hubUrl, repo, path: "config.json", revision: "refs/pr/1" })),
);
await call("downloadFile_raw_plain", async () =>
  blobSummary(await downloadFile({ hubUrl, repo, path: "config.json", raw: true })),
);
await call("downloadFile_raw_lfs", async () =>
  blobSummary(await downloadFile({ hubUrl, repo, path: "model.safetensors", raw: true })),
);

await call("downloadFile_raw_missing", async () =>
  blobSummary(await downloadFile({ hubUrl, repo, path: "missing.bin", raw: true })),
);

await call("downloadFileToCacheDir", async () => {
  const path = await downloadFileToCacheDir({ hubUrl, repo, path: "onnx/model_q4.onnx", cacheDir });
  const again = await downloadFileToCacheDir({ hubUrl, repo, path: "onnx/model_q4.onnx", cacheDir });
  return {
    path: relative(cacheDir, path),
    again: relative(cacheDir, again),
    blob: relative(cacheDir, await realpath(path)),
    sha256: sha256(await readFile(path)),
  };
});

await call("snapshotDownload", async () => {
  const folder = await snapshotDownload({ hubUrl, repo, cacheDir });
  return { folder: relative(cacheDir, folder), files: await walk(folder) };
});

await call("downloadFile_empty", async () =>
  blobSummary(await downloadFile({ hubUrl, repo: emptyRepo, path: "empty.txt" })),
);
await call("snapshotDownload_empty", async () => {
  const folder = await snapshotDownload({ hubUrl, repo: emptyRepo, cacheDir });
  return { folder: relative(cacheDir, folder), files: await walk(folder) };
});

await call("listCommits", () => collect(listCommits({ hubUrl, repo })));

await writeFile(resultFile, JSON.stringify(results));
