// The one place the page handles credentials.
//
// Auth is off by default (DESIGN §9: the service binds to 127.0.0.1), so today `token()` is null and
// both helpers hand back exactly what they were given. When `SERVICE_AUTH=jwt` is turned on, this is
// the seam: fetch() calls get an `Authorization: Bearer` header, and the browser transports that
// cannot send headers (EventSource, WebSocket) get a `?token=` query parameter (a short-lived,
// run-scoped stream token from `POST /v1/runs/{id}/stream-token`). Nothing else in the page reads
// or writes tokens.

const TOKEN_KEY = "chat.token";

/** The configured bearer token, or null when auth is off (the default). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** fetch() with the bearer header added when a token is configured. */
export function authFetch(url, init = {}) {
  const value = token();
  if (value === null) return fetch(url, init);
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${value}`);
  return fetch(url, { ...init, headers });
}

/** A URL for EventSource/WebSocket, with `?token=` added when a token is configured. */
export function streamUrl(url) {
  const value = token();
  if (value === null) return url;
  const full = new URL(url, location.href);
  full.searchParams.set("token", value);
  return full.toString();
}
