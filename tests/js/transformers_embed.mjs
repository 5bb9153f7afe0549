// Loads a feature-extraction pipeline with @huggingface/transformers from a node (env.remoteHost) and
// embeds one sentence; writes JSON: the vector, its dims, and every request the library sent. Run by
// tests/test_js_clients.py, which computes the same embedding in Python from the files the node holds.
// Settings come from the environment:
//   DEPOT_URL        the node, e.g. http://127.0.0.1:8980
//   DEPOT_REPO       a repo with config.json, tokenizer.json, tokenizer_config.json, onnx/model_quantized.onnx
//   DEPOT_CACHE_DIR  an empty folder for transformers.js's file cache
//   DEPOT_SENTENCE   the sentence to embed
//   DEPOT_DTYPE      the ONNX variant to load (q8: onnx/model_quantized.onnx)
//   DEPOT_RESULT     the file to write the JSON to
import { writeFile } from "node:fs/promises";

import { env, pipeline } from "@huggingface/transformers";

import { describeError, loggingFetch } from "./log_fetch.mjs";

const { DEPOT_URL, DEPOT_REPO, DEPOT_CACHE_DIR, DEPOT_SENTENCE, DEPOT_DTYPE, DEPOT_RESULT } = process.env;
if (!DEPOT_URL || !DEPOT_REPO || !DEPOT_CACHE_DIR || !DEPOT_SENTENCE || !DEPOT_DTYPE || !DEPOT_RESULT) {
  throw new Error("set DEPOT_URL, DEPOT_REPO, DEPOT_CACHE_DIR, DEPOT_SENTENCE, DEPOT_DTYPE and DEPOT_RESULT");
}

const requests = [];
env.fetch = loggingFetch(env.fetch, requests);
env.remoteHost = DEPOT_URL.replace(/\/*$/, "/");
env.allowLocalModels = false;
env.cacheDir = DEPOT_CACHE_DIR;

let result;
try {
  const extractor = await pipeline("feature-extraction", DEPOT_REPO, { dtype: DEPOT_DTYPE, device: "cpu" });
  const output = await extractor(DEPOT_SENTENCE, { pooling: "mean", normalize: true });
  result = { ok: true, dims: output.dims, vector: Array.from(output.data) };
  await extractor.dispose();
} catch (error) {
  result = { ok: false, error: describeError(error), stack: String(error?.stack ?? "") };
}
result.requests = requests;
await writeFile(DEPOT_RESULT, JSON.stringify(result));
