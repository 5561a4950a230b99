// The one place the page handles credentials.
//
// With auth off (the default: the service binds to 127.0.0.1) no token is set and every helper
// hands back what it was given. With `SERVICE_AUTH=jwt` the user pastes a bearer token into the
// page (kept in this tab's sessionStorage only): fetch() calls send it as `Authorization: Bearer`,
// and the transports that cannot send headers (EventSource, WebSocket) get `?token=` with a
// short-lived stream token minted for them (`POST /v1/runs/{id}/stream-token`, `POST /v1/ws-token`),
// never the bearer token itself. Nothing else in the page reads or writes tokens.

const TOKEN_KEY = "chat.token";

/** The bearer token the user gave this tab, or null (auth off). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Remember (or, with an empty value, forget) the bearer token for this tab. */
export function setToken(value) {
  const trimmed = (value || "").trim().replace(/^Bearer\s+/i, "");
  if (trimmed) sessionStorage.setItem(TOKEN_KEY, trimmed);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** fetch() with the bearer header added when a token is set. */
export function authFetch(url, init = {}) {
  const value = token();
  if (value === null) return fetch(url, init);
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${value}`);
  return fetch(url, { ...init, headers });
}

/**
 * A URL for EventSource/WebSocket: with a token set, `?token=` carries a stream token from
 * `mint()` (an async function answering `{token, expires_at}`), minted anew for every connection.
 */
export async function streamUrl(url, mint) {
  if (token() === null) return url;
  const full = new URL(url, location.href);
  full.searchParams.set("token", (await mint()).token);
  return full.toString();
}
