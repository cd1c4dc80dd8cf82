/*
 * imd.js — the browser client of imd (no dependencies).
 *
 *   var c = new IMD({token: "...", device: "laptop-1"});      // base: this page's origin
 *   c.on("msg", function (m) { ... });   // also "notice", "presence", "read", "ack", "auth",
 *   c.connect();                         // "error", "close", "state", "contacts", "sync"
 *   c.send("guest42", "Is the flat free?", {listing: "L1"}).then(function (ack) { ... });
 *   c.read("guest42", m.seq);            // read receipt up to that inbox seq
 *
 * Transports, tried in order: WebSocket (/ws), Server-Sent Events (/im/events) with POST
 * (/im/send), JSONP long-poll (/im/poll). Reconnects with jittered exponential backoff and
 * resumes after the last inbox seq it holds (kept in localStorage per user and device), so
 * nothing is missed and nothing is shown twice. Answers server pings, acknowledges what it
 * received, and re-sends unacknowledged messages with the same client id after a reconnect
 * (the server stores each id once).
 */
(function (root) {
  "use strict";

  function IMD(opts) {
    this.base = (opts.base || (root.location ? root.location.origin : "")).replace(/\/$/, "");
    this.token = opts.token;
    this.platform = opts.platform || "web";
    this.device = opts.device || IMD.deviceId();
    this.transports = opts.transports || ["ws", "sse", "poll"];
    this.handlers = {};
    this.state = "idle";
    this.transport = null;
    this.user = null;
    this.seq = null;             // last inbox seq held
    this.pending = {};           // client id -> {env, resolve, reject}
    this.nextId = 1;
    this.backoff = 500;
    this.failures = 0;
    this.conn = null;
    this.timer = null;
    this.stopped = false;
    this.ackTimer = null;
    this.syncing = false;
  }

  IMD.deviceId = function () {
    try {
      var id = root.localStorage.getItem("imd.device");
      if (!id) {
        id = "web-" + Math.random().toString(36).slice(2, 12);
        root.localStorage.setItem("imd.device", id);
      }
      return id;
    } catch (e) {
      return "web-" + Math.random().toString(36).slice(2, 12);
    }
  };

  IMD.prototype.on = function (type, fn) {
    (this.handlers[type] = this.handlers[type] || []).push(fn);
    return this;
  };

  IMD.prototype.emit = function (type, value) {
    var list = this.handlers[type] || [];
    for (var i = 0; i < list.length; i++) {
      try { list[i].call(this, value); } catch (e) { if (root.console) console.error(e); }
    }
  };

  IMD.prototype.setState = function (state) {
    if (this.state !== state) {
      this.state = state;
      this.emit("state", {state: state, transport: this.transport});
    }
  };

  // -- resume point -------------------------------------------------------------------
  IMD.prototype.storeKey = function () {
    return "imd.seq." + this.user + "." + this.device;
  };

  IMD.prototype.loadSeq = function (user) {
    this.user = user;
    try {
      var v = root.localStorage.getItem(this.storeKey());
      return v === null ? null : parseInt(v, 10);
    } catch (e) { return this.seq; }
  };

  IMD.prototype.saveSeq = function (seq) {
    this.seq = seq;
    try { root.localStorage.setItem(this.storeKey(), String(seq)); } catch (e) { /* private mode */ }
  };

  // -- connecting ---------------------------------------------------------------------
  IMD.prototype.connect = function () {
    this.stopped = false;
    this.open(this.transports[Math.min(this.failures, this.transports.length - 1)]);
    return this;
  };

  IMD.prototype.close = function () {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.conn) this.conn.close();
    this.conn = null;
    this.setState("closed");
  };

  IMD.prototype.query = function () {
    var q = "token=" + encodeURIComponent(this.token) + "&platform=" + this.platform +
            "&device=" + encodeURIComponent(this.device);
    var since = this.seq !== null ? this.seq : this.loadSeqFromToken();
    if (since !== null && since !== undefined && !isNaN(since)) q += "&since=" + since;
    return q;
  };

  IMD.prototype.loadSeqFromToken = function () {
    try {
      var claims = JSON.parse(atob(this.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
      return this.loadSeq(claims.sub);
    } catch (e) { return null; }
  };

  IMD.prototype.open = function (kind) {
    var self = this;
    this.transport = kind;
    this.setState("connecting");
    var t = (kind === "ws" && root.WebSocket) ? new WsTransport(this)
          : (kind !== "poll" && root.EventSource) ? new SseTransport(this)
          : new PollTransport(this);
    this.transport = t.kind;
    this.conn = t;
    t.start(function () { self.lost(t); });
  };

  IMD.prototype.lost = function (t) {
    if (t !== this.conn) return;
    this.conn = null;
    if (this.stopped) { this.setState("closed"); return; }
    if (this.state !== "live") this.failures++;      // never got through: next transport
    this.setState("reconnecting");
    var delay = Math.min(this.backoff * Math.pow(2, Math.min(this.failures, 6)), 30000);
    var self = this;
    this.timer = setTimeout(function () { self.connect(); }, delay * (0.5 + Math.random() / 2));
  };

  // -- receiving ----------------------------------------------------------------------
  IMD.prototype.receive = function (env) {
    switch (env.type) {
      case "auth":
        this.user = env.user;
        this.session = env.session;
        if (this.seq === null) {
          var stored = this.loadSeq(env.user);
          this.seq = stored === null ? null : stored;
        }
        this.failures = 0;
        this.setState("live");
        this.emit("auth", env);
        this.resend();
        break;
      case "msg":
      case "notice":
        // entries at or below the held seq come again after a reconnect or from sync:
        // still emitted (flagged) so a page can rebuild its history; dedupe by mid
        env.replayed = this.syncing || !!(env.seq && this.seq !== null && env.seq <= this.seq);
        if (env.seq && !env.replayed) { this.saveSeq(env.seq); this.scheduleAck(); }
        this.emit(env.type, env);
        break;
      case "ack":
        var p = this.pending[env.id];
        if (p) { delete this.pending[env.id]; p.resolve(env); }
        if (env.seq && (this.seq === null || env.seq === this.seq + 1)) this.saveSeq(env.seq);
        this.emit("ack", env);
        break;
      case "error":
        var q = env.id && this.pending[env.id];
        if (q && env.code !== 503) { delete this.pending[env.id]; q.reject(env); }
        this.emit("error", env);
        break;
      case "sync":
        this.syncing = false;
        this.emit("sync", env);
        break;
      case "ping":
        this.sendEnv({type: "pong"});
        break;
      case "close":
        if (!env.reconnect) this.stopped = env.code === 401 || env.code === 4001;
        this.emit("close", env);
        break;
      default:
        this.emit(env.type, env);
    }
  };

  IMD.prototype.scheduleAck = function () {
    var self = this;
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(function () {
      self.ackTimer = null;
      if (self.seq) self.sendEnv({type: "ack", seq: self.seq});
    }, 200);
  };

  // -- sending ------------------------------------------------------------------------
  IMD.prototype.sendEnv = function (env) {
    if (this.conn && this.state === "live") this.conn.send(env);
  };

  IMD.prototype.send = function (to, body, ctx) {
    var self = this;
    var id = this.device + "." + Date.now().toString(36) + "." + (this.nextId++);
    var env = {type: "msg", id: id, to: to, body: body};
    if (ctx) env.ctx = ctx;
    return new Promise(function (resolve, reject) {
      self.pending[id] = {env: env, resolve: resolve, reject: reject};
      self.sendEnv(env);
    });
  };

  IMD.prototype.resend = function () {
    for (var id in this.pending) {
      if (Object.prototype.hasOwnProperty.call(this.pending, id)) this.sendEnv(this.pending[id].env);
    }
  };

  IMD.prototype.read = function (peer, seq) { this.sendEnv({type: "read", peer: peer, seq: seq}); };
  IMD.prototype.sync = function (since, limit) {
    this.syncing = true;       // entries until the "sync" answer are history: flagged replayed
    this.sendEnv({type: "sync", since: since, limit: limit || 100});
  };
  IMD.prototype.presence = function (status) { this.sendEnv({type: "presence", status: status}); };

  // -- transports ---------------------------------------------------------------------
  function wsUrl(base) { return base.replace(/^http/, "ws"); }

  function WsTransport(c) { this.c = c; this.kind = "ws"; }
  WsTransport.prototype.start = function (onLost) {
    var c = this.c, ws = this.ws = new WebSocket(wsUrl(c.base) + "/ws?" + c.query());
    ws.onmessage = function (ev) { c.receive(JSON.parse(ev.data)); };
    ws.onclose = function () { onLost(); };
  };
  WsTransport.prototype.send = function (env) {
    if (this.ws.readyState === 1) this.ws.send(JSON.stringify(env));
  };
  WsTransport.prototype.close = function () { this.ws.onclose = null; this.ws.close(); };

  function post(c, env) {
    var xhr = new XMLHttpRequest();
    xhr.open("POST", c.base + "/im/send?token=" + encodeURIComponent(c.token) +
             "&session=" + encodeURIComponent(c.session));
    xhr.setRequestHeader("Content-Type", "application/json");
    xhr.send(JSON.stringify(env));
  }

  function SseTransport(c) { this.c = c; this.kind = "sse"; }
  SseTransport.prototype.start = function (onLost) {
    var c = this.c, es = this.es = new EventSource(c.base + "/im/events?" + c.query());
    es.onmessage = function (ev) { c.receive(JSON.parse(ev.data)); };
    es.onerror = function () { es.close(); onLost(); };
  };
  SseTransport.prototype.send = function (env) { post(this.c, env); };
  SseTransport.prototype.close = function () { this.es.close(); };

  var jsonpSeq = 0;
  function PollTransport(c) { this.c = c; this.kind = "poll"; this.live = true; this.session = null; }
  PollTransport.prototype.start = function (onLost) {
    this.onLost = onLost;
    this.poll(this.c.base + "/im/poll?" + this.c.query());
  };
  PollTransport.prototype.poll = function (url) {
    var self = this, c = this.c, name = "__imd_cb" + (jsonpSeq++);
    var script = document.createElement("script");
    var timer = setTimeout(function () { done(null); }, 90000);
    function done(envs) {
      clearTimeout(timer);
      delete root[name];
      if (script.parentNode) script.parentNode.removeChild(script);
      if (!self.live) return;
      if (envs === null) { self.live = false; self.onLost(); return; }
      for (var i = 0; i < envs.length; i++) {
        if (envs[i].type === "auth") self.session = envs[i].session;
        c.receive(envs[i]);
      }
      self.poll(c.base + "/im/poll?token=" + encodeURIComponent(c.token) + "&session=" +
                encodeURIComponent(self.session) + (c.seq ? "&ack=" + c.seq : ""));
    }
    root[name] = done;
    script.onerror = function () { done(null); };
    script.src = url + "&cb=" + name;
    document.head.appendChild(script);
  };
  PollTransport.prototype.send = function (env) { post(this.c, env); };
  PollTransport.prototype.close = function () { this.live = false; };

  root.IMD = IMD;
})(typeof window !== "undefined" ? window : this);
