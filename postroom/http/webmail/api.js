// The REST API v1 with the bearer token kept in sessionStorage (see README: no cookie, so no
// request carries credentials on its own and cross-site request forgery has nothing to ride on).
const KEY = "postroom.session";

export class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

export const session = {
  get() { try { return JSON.parse(sessionStorage.getItem(KEY) || "null"); } catch { return null; } },
  set(value) { sessionStorage.setItem(KEY, JSON.stringify(value)); },
  clear() { sessionStorage.removeItem(KEY); },
};

let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

export async function call(method, path, body, extraHeaders) {
  const s = session.get();
  const headers = { Accept: "application/json", ...(extraHeaders || {}) };
  if (s && !headers.Authorization) headers.Authorization = `Bearer ${s.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
  if (response.status === 204) return null;
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    const err = (data && data.error) || {};
    if (response.status === 401 && !(extraHeaders && extraHeaders.Authorization)) onUnauthorized();
    throw new ApiError(response.status, err.code || "http_error", err.message || response.statusText);
  }
  return data;
}

export async function signIn(address, password) {
  const basic = btoa(String.fromCharCode(...new TextEncoder().encode(`${address}:${password}`)));
  const data = await call("POST", "/v1/auth/token", { ttl_seconds: 12 * 3600 },
    { Authorization: `Basic ${basic}` });
  session.set({ token: data.token, address, expires_at: data.expires_at });
  return data;
}

export async function signOut() {
  try { await call("DELETE", "/v1/auth/token"); } catch { /* gone already */ }
  session.clear();
}

export const folders = () => call("GET", "/v1/folders");
export const listMessages = (folderId, cursor, limit = 50) =>
  call("GET", `/v1/folders/${encodeURIComponent(folderId)}/messages?limit=${limit}` +
    (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
export const search = (q, cursor, limit = 50) =>
  call("GET", `/v1/search?q=${encodeURIComponent(q)}&limit=${limit}` +
    (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
export const thread = (id) => call("GET", `/v1/threads/${encodeURIComponent(id)}`);
export const message = (id) => call("GET", `/v1/messages/${encodeURIComponent(id)}`);
export const patchMessage = (id, body) => call("PATCH", `/v1/messages/${encodeURIComponent(id)}`, body);
export const deleteMessage = (id) => call("DELETE", `/v1/messages/${encodeURIComponent(id)}`);
export const reportSpam = (id, spam) =>
  call("POST", `/v1/messages/${encodeURIComponent(id)}/${spam ? "spam" : "not-spam"}`);
export const send = (body) => call("POST", "/v1/messages", body);
export const saveDraft = (id, body) => id
  ? call("PUT", `/v1/drafts/${encodeURIComponent(id)}`, body)
  : call("POST", "/v1/drafts", body);
export const discardDraft = (id) => call("DELETE", `/v1/drafts/${encodeURIComponent(id)}`);

export async function attachmentBlob(url) {
  const s = session.get();
  const response = await fetch(url, { headers: { Authorization: `Bearer ${s.token}` },
    credentials: "omit", referrerPolicy: "no-referrer" });
  if (!response.ok) throw new ApiError(response.status, "http_error", response.statusText);
  return response.blob();
}
