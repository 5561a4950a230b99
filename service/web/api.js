// The HTTP API (DESIGN §4), as small async functions. Every error has the shape
// {"error": {"code", "message", "detail"}}; it is thrown as an ApiError.

import { authFetch } from "./auth.js";

export class ApiError extends Error {
  constructor(status, code, message, detail = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await authFetch(path, init);
  } catch (err) {
    throw new ApiError(0, "network_error", `${method} ${path}: ${err.message}`);
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || text, error.detail);
  }
  return data;
}

const enc = encodeURIComponent;

export const listModels = () => call("GET", "/v1/models");
export const listChats = (limit = 50) => call("GET", `/v1/chats?limit=${limit}`);
export const createChat = (body) => call("POST", "/v1/chats", body);
export const getChat = (chatId) => call("GET", `/v1/chats/${enc(chatId)}`);
export const activeRun = (chatId) => call("GET", `/v1/chats/${enc(chatId)}/active-run`);
/** Start a run; without `Accept: text/event-stream` the answer is 202 with the run and its events_url. */
export const startRun = (chatId, body) => call("POST", `/v1/chats/${enc(chatId)}/runs`, body);
export const getRun = (runId) => call("GET", `/v1/runs/${enc(runId)}`);
export const cancelRun = (runId) => call("POST", `/v1/runs/${enc(runId)}/cancel`);
/** Short-lived tokens for `?token=` (auth on): one run's events, or one WebSocket handshake. */
export const streamToken = (runId) => call("POST", `/v1/runs/${enc(runId)}/stream-token`);
export const wsToken = () => call("POST", "/v1/ws-token");
