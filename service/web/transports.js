// The two ways the page follows a run, behind one interface:
//
//   start(chatId, body, handlers)          start a run on the chat and follow it from its first event
//   follow(run, after, handlers)           follow an existing run from after seq `after` (resume)
//   cancel(runId)                          Stop
//   detach(runId)                          stop following (the run goes on, server side)
//
// handlers: onRun(run) once the run id is known, onEvent(event) per event, onEnd() when the
// transport knows no more events will come without a terminal event having been seen (an
// EventSource answered 204, a resumed run with nothing left), onError(error) for error frames.

import * as api from "./api.js";
import { streamUrl } from "./auth.js";
import { TERMINAL_STATUS } from "./run-view.js";

/** EventSource on GET /v1/runs/{id}/events; its own reconnects send Last-Event-ID. */
export class SseTransport {
  constructor() {
    this.sources = new Map();
  }

  async start(chatId, body, handlers) {
    const run = await api.startRun(chatId, body); // no Accept: text/event-stream -> 202 + events_url
    handlers.onRun(run);
    await this.follow(run, 0, handlers);
  }

  async follow(run, after, handlers) {
    this.detach(run.id);
    const url = await streamUrl(`${run.events_url}?after=${after}`, () => api.streamToken(run.id));
    const source = new EventSource(url);
    const tokened = url.includes("token=");
    this.sources.set(run.id, source);
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      after = event.seq ?? after;
      handlers.onEvent(event);
      if (event.type in TERMINAL_STATUS) this.detach(run.id); // or it would reconnect and get 204
    };
    source.onerror = () => {
      // CONNECTING: EventSource reconnects by itself, sending Last-Event-ID; with auth on its URL's
      // stream token may have expired, so the page reconnects itself with a fresh one instead.
      // CLOSED: a 204 (all events delivered) or an error status: nothing more comes on this source.
      const reconnecting = source.readyState === EventSource.CONNECTING;
      handlers.onConnection?.(reconnecting ? "reconnecting" : "closed");
      if (reconnecting && tokened) {
        this.follow(run, after, handlers).catch((err) => handlers.onError({ code: err.code, message: err.message }));
      } else if (!reconnecting) {
        this.detach(run.id);
        handlers.onEnd();
      }
    };
    source.onopen = () => handlers.onConnection?.("open");
  }

  async cancel(runId) {
    await api.cancelRun(runId);
  }

  detach(runId) {
    this.sources.get(runId)?.close();
    this.sources.delete(runId);
  }
}

/** One WebSocket per tab, runs multiplexed by run id; after a drop it reconnects and resumes. */
export class WsTransport {
  constructor(onSocketError) {
    this.onSocketError = onSocketError;
    this.socket = null;
    this.opened = null;
    this.pending = new Map(); // client_ref -> handlers, until run.accepted
    this.followed = new Map(); // run_id -> {handlers, lastSeq}
    this.refs = 0;
  }

  connect() {
    if (this.opened) return this.opened;
    this.opened = this.open();
    this.opened.catch(() => {
      this.opened = null; // reported by whoever awaits it; the next send tries again
    });
    return this.opened;
  }

  async open() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(await streamUrl(`${scheme}//${location.host}/v1/ws`, api.wsToken));
    this.socket = socket;
    socket.onmessage = (message) => this.dispatch(JSON.parse(message.data));
    socket.onclose = () => this.dropped(socket);
    return new Promise((resolve, reject) => {
      socket.onopen = () => resolve(socket);
      socket.onerror = () => reject(new Error("the WebSocket could not connect"));
    });
  }

  async send(frame) {
    const socket = await this.connect();
    socket.send(JSON.stringify(frame));
  }

  async start(chatId, body, handlers) {
    const ref = `ref-${Date.now()}-${++this.refs}`;
    this.pending.set(ref, handlers);
    try {
      await this.send({ type: "run.create", client_ref: ref, chat_id: chatId, ...body });
    } catch (err) {
      this.pending.delete(ref);
      throw err;
    }
  }

  async follow(run, after, handlers) {
    this.followed.set(run.id, { handlers, lastSeq: after });
    await this.send({ type: "run.resume", run_id: run.id, after });
  }

  async cancel(runId) {
    await this.send({ type: "run.cancel", run_id: runId });
  }

  detach(runId) {
    this.followed.delete(runId); // frames still in flight for it are ignored
  }

  dispatch(frame) {
    switch (frame.type) {
      case "run.accepted": {
        const handlers = this.pending.get(frame.client_ref);
        if (!handlers) return;
        this.pending.delete(frame.client_ref);
        this.followed.set(frame.run_id, { handlers, lastSeq: 0 });
        handlers.onRun({ id: frame.run_id });
        return;
      }
      case "run.resumed": {
        const entry = this.followed.get(frame.run_id);
        if (entry && frame.status !== "running" && frame.last_seq <= frame.after) {
          this.detach(frame.run_id);
          entry.handlers.onEnd(); // finished, nothing left to send
        }
        return;
      }
      case "pong":
        return;
      case "error":
        this.error(frame);
        return;
      default: {
        const entry = this.followed.get(frame.run_id);
        if (!entry) return;
        entry.lastSeq = Math.max(entry.lastSeq, frame.seq || 0);
        entry.handlers.onEvent(frame);
        if (frame.type in TERMINAL_STATUS) this.detach(frame.run_id);
      }
    }
  }

  error(frame) {
    const error = { code: frame.code, message: frame.message };
    const handlers = this.pending.get(frame.ref) || this.followed.get(frame.ref)?.handlers;
    this.pending.delete(frame.ref);
    if (handlers) handlers.onError(error);
    else this.onSocketError(error);
  }

  dropped(socket) {
    if (socket !== this.socket) return;
    this.socket = null;
    this.opened = null;
    for (const handlers of this.pending.values()) {
      handlers.onError({ code: "socket_closed", message: "the WebSocket closed before the run started" });
    }
    this.pending.clear();
    if (this.followed.size === 0) return;
    for (const entry of this.followed.values()) entry.handlers.onConnection?.("reconnecting");
    setTimeout(() => this.resumeAll(), 1000);
  }

  async resumeAll() {
    try {
      for (const [runId, entry] of this.followed) {
        await this.send({ type: "run.resume", run_id: runId, after: entry.lastSeq });
        entry.handlers.onConnection?.("open");
      }
    } catch {
      // still down: the failed socket's onclose schedules the next try
    }
  }
}
