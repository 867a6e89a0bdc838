// The live push channel: GET /v1/events over a WebSocket. The token travels as a subprotocol
// ("bearer.TOKEN"); the server answers with "postroom.v1". After a drop it reconnects with the
// last event id it saw, so the server replays what was missed (or says "resync").
export class Push {
  constructor(token, { onFrame, onState, onUnauthorized }) {
    this.token = token;
    this.onFrame = onFrame;
    this.onState = onState || (() => {});
    this.onUnauthorized = onUnauthorized || (() => {});
    this.lastId = null;
    this.ws = null;
    this.stopped = false;
    this.backoff = 500;
    this.heartbeat = 25;
    this.watchdog = null;
  }

  start() { this.stopped = false; this.connect(); }

  stop() {
    this.stopped = true;
    clearTimeout(this.watchdog);
    if (this.ws) this.ws.close(1000);
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const query = this.lastId ? `?last_event_id=${encodeURIComponent(this.lastId)}` : "";
    const ws = new WebSocket(`${scheme}://${location.host}/v1/events${query}`,
      ["postroom.v1", `bearer.${this.token}`]);
    this.ws = ws;
    this.onState("connecting");
    ws.onmessage = (message) => {
      let frame;
      try { frame = JSON.parse(message.data); } catch { return; }
      this.arm();
      if (frame.type === "ready") {
        this.backoff = 500;
        this.heartbeat = frame.heartbeat || 25;
        this.onState("live");
      }
      if (frame.id) this.lastId = frame.id;
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      clearTimeout(this.watchdog);
      if (this.ws !== ws) return;
      this.ws = null;
      if (event.code === 4401) { this.onState("offline"); this.onUnauthorized(); return; }
      if (this.stopped) return;
      this.onState("reconnecting");
      const wait = this.backoff * (0.75 + Math.random() / 2);
      this.backoff = Math.min(this.backoff * 2, 15000);
      setTimeout(() => { if (!this.stopped) this.connect(); }, wait);
    };
  }

  // No frame for 2.5 heartbeats: the connection is dead even if the socket does not know yet.
  arm() {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => { if (this.ws) this.ws.close(); }, this.heartbeat * 2500);
  }
}
