// A fetch that records every request it sends and what came back (method, URL, request headers, status,
// the response headers a Hub client reads), so tests/test_js_clients.py can show what a client sent when a
// call fails. It calls the real global fetch unchanged: the clients under test see no difference.

const SHOWN = [
  "content-type",
  "content-length",
  "content-range",
  "etag",
  "x-linked-etag",
  "x-linked-size",
  "x-repo-commit",
  "link",
  "location",
  "x-error-code",
  "x-error-message",
  "x-request-id",
];

export function loggingFetch(realFetch, log) {
  return async function fetch(input, init = {}) {
    const url = input instanceof Request ? input.url : String(input);
    const method = (init.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
    const headers = Object.fromEntries(new Headers(init.headers ?? (input instanceof Request ? input.headers : {})));
    const entry = { method, url, headers };
    if (typeof init.body === "string") entry.body = init.body;
    log.push(entry);
    try {
      const response = await realFetch(input, init);
      entry.status = response.status;
      entry.response = Object.fromEntries(SHOWN.filter((h) => response.headers.has(h)).map((h) => [h, response.headers.get(h)]));
      return response;
    } catch (error) {
      entry.error = String(error?.cause ?? error);
      throw error;
    }
  };
}

export function describeError(error) {
  const out = { name: error?.name, message: String(error?.message ?? error) };
  if (error?.statusCode !== undefined) out.statusCode = error.statusCode;
  if (error?.url !== undefined) out.url = error.url;
  if (error?.data !== undefined) out.data = error.data;
  return out;
}
