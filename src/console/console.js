// Switchboard console: connect to /ws, subscribe, publish, send, watch events
// and server status. Plain JS, no dependencies, no build step. Everything
// that comes from the network is put in the DOM with textContent.
'use strict';

(() => {
  const MAX_ENTRIES = 2000; // log entries kept (oldest dropped)
  const MAX_SHOWN_BYTES = 64 * 1024; // longer messages are shown cut
  const STATUS_EVERY_MS = 2000;
  const API_TIMEOUT_MS = 10000;

  const $ = (id) => document.getElementById(id);

  let ws = null; // the current WebSocket, until its close event
  let requestSeq = 0;
  let received = 0;
  const subs = new Set();

  // ---------- small helpers ----------

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const pad = (n, w = 2) => String(n).padStart(w, '0');
  function clock(d = new Date()) {
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  let noticeTimer = null;
  function notice(text, isError) {
    const n = $('notice');
    n.textContent = text;
    n.title = text;
    n.classList.toggle('err', !!isError);
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { n.textContent = ''; n.title = ''; }, 8000);
  }

  function result(id, text, kind) {
    const r = $(id);
    r.textContent = text;
    r.className = 'result' + (kind ? ' ' + kind : '');
  }

  // Lossless re-indentation of JSON text: numbers, escapes and key order stay
  // exactly as the server sent them (data is forwarded byte for byte).
  // Objects and arrays that fit in INLINE_MAX characters stay on one line.
  const INLINE_MAX = 72;
  const WS = ' \t\r\n';

  // `text[i]` opens a container: its one-line form if it is short, else null.
  function inlineForm(text, i) {
    let out = '';
    let depth = 0;
    let inStr = false;
    let esc = false;
    for (let j = i; j < text.length && out.length <= INLINE_MAX; j++) {
      const c = text[j];
      if (inStr) {
        out += c;
        if (esc) esc = false;
        else if (c === '\\') esc = true;
        else if (c === '"') inStr = false;
        continue;
      }
      if (WS.includes(c)) continue;
      if (c === '"') inStr = true;
      else if (c === '{' || c === '[') depth++;
      else if (c === '}' || c === ']') depth--;
      out += c === ',' ? ', ' : c === ':' ? ': ' : c;
      if (depth === 0) return out.length <= INLINE_MAX ? { out, end: j } : null;
    }
    return null;
  }

  function pretty(text) {
    let out = '';
    let indent = 0;
    let inStr = false;
    let esc = false;
    const nl = () => '\n' + '  '.repeat(indent);
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (inStr) {
        out += c;
        if (esc) esc = false;
        else if (c === '\\') esc = true;
        else if (c === '"') inStr = false;
        continue;
      }
      switch (c) {
        case '"': inStr = true; out += c; break;
        case '{': case '[': {
          // The outermost object is always spread out, one field a line.
          const short = indent > 0 || out !== '' ? inlineForm(text, i) : null;
          if (short) { out += short.out; i = short.end; break; }
          indent++;
          out += c + nl();
          break;
        }
        case '}': case ']': indent = Math.max(0, indent - 1); out += nl() + c; break;
        case ',': out += ',' + nl(); break;
        case ':': out += ': '; break;
        case ' ': case '\t': case '\r': case '\n': break;
        default: out += c;
      }
    }
    return out;
  }

  // The data textareas: valid JSON is sent as written, anything else as a string.
  function dataJson(text) {
    const t = text.trim();
    if (t === '') return 'null';
    try { JSON.parse(t); return t; } catch { return JSON.stringify(text); }
  }

  function fmtNum(v) {
    return typeof v === 'number' && isFinite(v) ? v.toLocaleString('en-US') : (v === undefined || v === null ? '–' : String(v));
  }
  function fmtBytes(v) {
    if (typeof v !== 'number' || !isFinite(v)) return fmtNum(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let x = v;
    let u = 0;
    while (x >= 1024 && u < units.length - 1) { x /= 1024; u++; }
    return u === 0 ? `${v} B` : `${x.toFixed(x < 10 ? 2 : 1)} ${units[u]}`;
  }
  function fmtDuration(s) {
    if (typeof s !== 'number' || !isFinite(s)) return fmtNum(s);
    s = Math.floor(s);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m ${sec}s`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }
  function fmtTime(v) {
    if (typeof v === 'number') return new Date(v < 1e12 ? v * 1000 : v).toLocaleString();
    return v === undefined || v === null ? 'unknown' : String(v);
  }

  // ---------- remembered inputs ----------

  const REMEMBER = [
    ['userId', localStorage], ['channel', localStorage], ['pubChannel', localStorage],
    ['sendTo', localStorage], ['token', sessionStorage], ['apiKey', sessionStorage],
  ];
  function restoreInputs() {
    for (const [id, store] of REMEMBER) {
      try {
        const v = store.getItem('switchboard.' + id);
        if (v !== null) $(id).value = v;
      } catch { /* storage may be disabled */ }
    }
  }
  function rememberInputs() {
    for (const [id, store] of REMEMBER) {
      try { store.setItem('switchboard.' + id, $(id).value); } catch { /* ignore */ }
    }
  }

  // ---------- server addresses ----------

  function serverUrl() {
    const raw = $('url').value.trim() || location.origin;
    try {
      return new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : 'http://' + raw);
    } catch {
      throw new Error('invalid server URL: ' + raw);
    }
  }
  const secure = (u) => u.protocol === 'https:' || u.protocol === 'wss:';

  // ws(s)://host/ws?token=..&userId=.. ; a URL with its own path keeps it.
  function wsUrl() {
    const u = serverUrl();
    const w = new URL(u.href);
    w.protocol = secure(u) ? 'wss:' : 'ws:';
    if (w.pathname === '' || w.pathname === '/') w.pathname = '/ws';
    w.hash = '';
    const token = $('token').value.trim();
    const userId = $('userId').value.trim();
    if (token) w.searchParams.set('token', token);
    if (userId) w.searchParams.set('userId', userId);
    return w.href;
  }

  function apiBase() {
    const u = serverUrl();
    return (secure(u) ? 'https://' : 'http://') + u.host;
  }

  // One HTTP API call. body: JSON text or undefined. Errors carry the server's message.
  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    // Every POST says JSON: the API refuses other POSTs (they could come cross-site).
    if (body !== undefined || method === 'POST') headers['Content-Type'] = 'application/json';
    const key = $('apiKey').value.trim();
    if (key) headers.Authorization = 'Bearer ' + key;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), API_TIMEOUT_MS);
    let resp;
    let text;
    try {
      resp = await fetch(apiBase() + path, { method, headers, body, signal: ctl.signal, cache: 'no-store' });
      text = await resp.text();
    } catch (e) {
      throw new Error(e && e.name === 'AbortError' ? `${method} ${path}: no answer in ${API_TIMEOUT_MS / 1000} s` : `${method} ${path}: ${e && e.message ? e.message : e}`);
    } finally {
      clearTimeout(timer);
    }
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
    if (!resp.ok) {
      let msg = `${resp.status}${resp.statusText ? ' ' + resp.statusText : ''}`;
      const err = json && typeof json === 'object' ? json.error : null;
      if (err && typeof err === 'object') {
        msg += ': ' + [err.code, err.message].filter((x) => x !== undefined && x !== null && x !== '').join(' – ');
      } else if (typeof err === 'string') {
        msg += ': ' + err;
      } else if (text) {
        msg += ': ' + text.trim().slice(0, 300);
      }
      const e = new Error(msg);
      e.status = resp.status;
      throw e;
    }
    return json;
  }

  // ---------- event log ----------

  const log = () => $('log');

  function summary(msg) {
    if (!msg || typeof msg !== 'object') return '';
    const parts = [];
    if (msg.type === 'error') parts.push(`${msg.code || ''} ${msg.message || ''}`.trim());
    if (msg.type === 'connected') parts.push(`${msg.userId} on ${msg.connectionId}`);
    if (typeof msg.channel === 'string') parts.push(msg.channel);
    if (msg.from !== undefined) parts.push(`from ${msg.from}`);
    if (msg.to !== undefined) parts.push(`to ${msg.to}`);
    if (msg.connections !== undefined) parts.push(`${msg.connections} conn`);
    if (msg.action !== undefined) parts.push(String(msg.action));
    if (msg.requestId !== undefined) parts.push(`#${msg.requestId}`);
    return parts.join(' · ');
  }

  function matches(entry) {
    const f = $('filter').value.trim().toLowerCase();
    return !f || entry.dataset.search.includes(f);
  }

  function updateCount() {
    const total = log().childElementCount;
    const f = $('filter').value.trim();
    let text = `${received} received`;
    if (f) {
      let shown = 0;
      for (const e of log().children) if (!e.hidden) shown++;
      text += ` · ${shown} of ${total} shown`;
    }
    $('count').textContent = text;
  }

  // dir: 'in' (from the server), 'out' (sent by this console), 'sys' (local).
  function addEntry(dir, type, text, msg) {
    const entry = el('div', 'entry');
    entry.dataset.dir = dir;
    entry.dataset.type = type;
    const head = el('div', 'head');
    head.append(
      el('span', 'time', clock()),
      el('span', 'dir', dir === 'in' ? '↓' : dir === 'out' ? '↑' : '•'),
      el('span', 'type', type),
      el('span', 'summary', summary(msg)),
    );
    entry.append(head);
    if (text !== undefined && text !== null) {
      let shown = msg !== undefined && msg !== null ? pretty(text) : text;
      if (shown.length > MAX_SHOWN_BYTES) {
        shown = shown.slice(0, MAX_SHOWN_BYTES) + `\n… (${text.length} characters, cut)`;
      }
      entry.append(el('pre', '', shown));
    }
    if (type === 'error' || type === 'ERROR') entry.classList.add('error');
    entry.dataset.search = (type + ' ' + (text || '') + ' ' + head.textContent).toLowerCase();
    entry.hidden = !matches(entry);
    const l = log();
    l.prepend(entry);
    while (l.childElementCount > MAX_ENTRIES) l.lastElementChild.remove();
    updateCount();
    return entry;
  }

  function sys(type, text) {
    return addEntry('sys', type, text);
  }

  function logSent(type, text, msg) {
    if ($('showSent').checked) addEntry('out', type, text, msg);
  }

  // ---------- connection ----------

  function setState(state, detail) {
    const s = $('state');
    s.dataset.state = state;
    s.textContent = detail ? `${state} ${detail}` : state;
    const busy = ws !== null;
    $('connect').disabled = busy;
    $('disconnect').disabled = !busy;
  }

  function redactToken(url) {
    try {
      const u = new URL(url);
      if (u.searchParams.has('token')) u.searchParams.set('token', '…');
      return u.href;
    } catch {
      return url;
    }
  }

  function connect() {
    if (ws) return;
    rememberInputs();
    let url;
    try { url = wsUrl(); } catch (e) { result('connResult', e.message, 'err'); return; }
    result('connResult', '');
    let sock;
    try {
      sock = new WebSocket(url);
    } catch (e) {
      result('connResult', 'cannot connect: ' + e.message, 'err');
      return;
    }
    ws = sock;
    setState('connecting');
    sys('ws:connecting', redactToken(url));
    sock.onopen = () => {
      if (ws !== sock) return;
      setState('open', '(authenticating)');
    };
    sock.onmessage = (ev) => {
      if (ws === sock) onMessage(ev);
    };
    sock.onerror = () => {
      if (ws === sock) sys('ws:error', 'WebSocket error (the close code follows)');
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      const why = `${ev.code}${ev.reason ? ' ' + ev.reason : ''}`;
      setState('closed', why);
      sys('ws:close', `closed ${why}${ev.wasClean ? '' : ' (not clean)'}`);
      $('connectionId').textContent = '–';
      $('connUserId').textContent = '–';
      subs.clear();
      renderSubs();
    };
  }

  function disconnect() {
    if (!ws) return;
    setState('closing');
    try { ws.close(1000, 'console disconnect'); } catch { /* already closing */ }
  }

  // Send a JSON text over the socket; false (and a notice) when not connected.
  function send(text, type) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      notice('not connected: connect first', true);
      return false;
    }
    ws.send(text);
    let msg = null;
    try { msg = JSON.parse(text); } catch { /* raw text */ }
    logSent(type || (msg && typeof msg.type === 'string' ? msg.type : '(raw)'), text, msg);
    return true;
  }

  const sendObj = (obj) => send(JSON.stringify(obj), obj.type);

  function onMessage(ev) {
    if (typeof ev.data !== 'string') {
      received++;
      addEntry('in', '(binary)', `${ev.data.size || ev.data.byteLength || 0} bytes of binary data`);
      return;
    }
    let msg = null;
    try { msg = JSON.parse(ev.data); } catch { /* shown raw */ }
    const isObj = msg !== null && typeof msg === 'object' && !Array.isArray(msg);
    const type = isObj && typeof msg.type === 'string' ? msg.type : isObj ? '(no type)' : '(not json)';
    received++;
    const entry = addEntry('in', type, ev.data, msg);
    if (!isObj) return;
    switch (type) {
      case 'connected':
        setState('connected');
        $('connectionId').textContent = msg.connectionId !== undefined ? String(msg.connectionId) : '?';
        $('connUserId').textContent = msg.userId !== undefined ? String(msg.userId) : '?';
        if (Array.isArray(msg.channels)) for (const c of msg.channels) if (typeof c === 'string') subs.add(c);
        renderSubs();
        break;
      case 'subscribed':
        if (typeof msg.channel === 'string') { subs.add(msg.channel); renderSubs(); }
        break;
      case 'unsubscribed':
        if (typeof msg.channel === 'string') { subs.delete(msg.channel); renderSubs(); }
        break;
      case 'error':
      case 'ERROR':
        notice(`error ${msg.code || ''}: ${msg.message || ''}`, true);
        break;
      default:
        break;
    }
    // Offline inbox delivery: acknowledge what asks for it.
    if (msg.ack === true && msg.id !== undefined && msg.id !== null) {
      if (send(JSON.stringify({ type: 'ack', id: msg.id }), 'ack')) {
        entry.querySelector('.head').append(el('span', 'tag', 'acked'));
      }
    }
  }

  // ---------- subscriptions ----------

  function renderSubs() {
    const ul = $('subs');
    ul.replaceChildren();
    if (subs.size === 0) {
      ul.append(el('li', 'empty dim', 'no subscriptions'));
      return;
    }
    for (const c of [...subs].sort()) {
      const li = el('li', 'sub');
      li.dataset.channel = c;
      const name = el('span', '', c);
      name.title = 'use for publish';
      name.addEventListener('click', () => { $('pubChannel').value = c; $('channel').value = c; });
      const x = el('button', '', '×');
      x.type = 'button';
      x.title = 'unsubscribe ' + c;
      x.setAttribute('aria-label', 'unsubscribe ' + c);
      x.addEventListener('click', () => sendObj({ type: 'unsubscribe', channel: c }));
      li.append(name, x);
      ul.append(li);
    }
  }

  function channelInput(id) {
    const c = $(id).value.trim();
    if (!c) {
      notice('enter a channel', true);
      $(id).focus();
      return null;
    }
    rememberInputs();
    return c;
  }

  // ---------- publish / send ----------

  async function apiAction(resultId, label, path, body, describe) {
    rememberInputs();
    result(resultId, `${label}…`);
    logSent(`api:${path.replace('/api/', '')}`, body, JSON.parse(body));
    try {
      const r = await api('POST', path, body);
      result(resultId, describe(r || {}), 'ok');
    } catch (e) {
      result(resultId, `${label}: ${e.message}`, 'err');
    }
  }

  function publishWs() {
    const ch = channelInput('pubChannel');
    if (ch === null) return;
    const text = `{"type":"publish","channel":${JSON.stringify(ch)},"data":${dataJson($('pubData').value)}}`;
    if (send(text, 'publish')) result('pubResult', '');
  }

  function publishApi() {
    const ch = channelInput('pubChannel');
    if (ch === null) return;
    const body = `{"channel":${JSON.stringify(ch)},"data":${dataJson($('pubData').value)}}`;
    apiAction('pubResult', 'POST /api/publish', '/api/publish', body, (r) =>
      `published on ${r.channel ?? ch}: offset ${fmtNum(r.offset)}, epoch ${fmtNum(r.epoch)}, ${fmtNum(r.connections)} connection(s)`);
  }

  function recipient() {
    const to = $('sendTo').value.trim();
    if (!to) {
      notice('enter a user id to send to', true);
      $('sendTo').focus();
      return null;
    }
    return to;
  }

  function sendWs() {
    const to = recipient();
    if (to === null) return;
    rememberInputs();
    const ack = $('sendAck').checked ? ',"ack":true' : '';
    const text = `{"type":"send","to":${JSON.stringify(to)},"data":${dataJson($('sendData').value)}${ack}}`;
    if (send(text, 'send')) result('sendResult', '');
  }

  function sendApi() {
    const to = recipient();
    if (to === null) return;
    const ack = $('sendAck').checked ? ',"ack":true' : '';
    const body = `{"userId":${JSON.stringify(to)},"data":${dataJson($('sendData').value)}${ack}}`;
    apiAction('sendResult', 'POST /api/send', '/api/send', body, (r) =>
      `sent to ${r.userId ?? to}: ${fmtNum(r.connections)} connection(s)${r.stored !== undefined ? `, stored ${r.stored}` : ''}`);
  }

  function broadcastWs() {
    send(`{"type":"broadcast","data":${dataJson($('sendData').value)}}`, 'broadcast');
  }

  function request(action, data) {
    const obj = { type: 'request', requestId: `c${++requestSeq}`, action };
    if (data !== undefined) obj.data = data;
    sendObj(obj);
  }

  async function mintToken() {
    const userId = $('userId').value.trim();
    if (!userId) {
      result('connResult', 'enter a user id to mint a token for', 'err');
      $('userId').focus();
      return;
    }
    const body = { userId };
    if ($('mintAdmin').checked) body.role = 'admin';
    result('connResult', 'POST /api/token…');
    try {
      const r = await api('POST', '/api/token', JSON.stringify(body));
      if (!r || typeof r.token !== 'string') throw new Error('the answer has no token');
      $('token').value = r.token;
      rememberInputs();
      result('connResult', `token for ${userId}${body.role ? ' (admin)' : ''} minted, expires ${r.expiresAt === null ? 'never (the shared token)' : fmtTime(r.expiresAt)}; connect to use it`, 'ok');
    } catch (e) {
      const hint = e.status === 404 || e.status === 409 ? ' (minting needs auth.mode = "jwt" with an HS secret, or auth.mode = "token")' : '';
      result('connResult', `mint: ${e.message}${hint}`, 'err');
    }
  }

  // ---------- server status ----------

  let statusTimer = null;
  let statusBusy = false;
  let statusAgain = false;

  function setStat(id, value, formatted) {
    const d = $(id);
    d.textContent = formatted;
    if (typeof value === 'number') {
      d.dataset.value = String(value);
      d.title = value.toLocaleString('en-US');
    } else {
      delete d.dataset.value;
      d.title = '';
    }
  }

  function renderStatus(s) {
    setStat('statVersion', s.version, s.version ?? '–');
    setStat('statUptime', s.uptimeSeconds, fmtDuration(s.uptimeSeconds));
    setStat('statConnections', s.connections, fmtNum(s.connections));
    setStat('statUsers', s.usersOnline, fmtNum(s.usersOnline));
    setStat('statChannels', s.channels, fmtNum(s.channels));
    setStat('statMessagesIn', s.messagesIn, fmtNum(s.messagesIn));
    setStat('statMessagesOut', s.messagesOut, fmtNum(s.messagesOut));
    setStat('statBytesIn', s.bytesIn, fmtBytes(s.bytesIn));
    setStat('statBytesOut', s.bytesOut, fmtBytes(s.bytesOut));
    setStat('statQueue', s.writerQueueDepth, fmtNum(s.writerQueueDepth));
    setStat('statSlow', s.slowConsumerCloses, fmtNum(s.slowConsumerCloses));
    setStat('statRejected', s.rejectedConnections, fmtNum(s.rejectedConnections));
    setStat('statRevoked', s.revokedCloses, fmtNum(s.revokedCloses));
    setStat('statRecords', s.recordsStored, fmtNum(s.recordsStored));
    setStat('statStorage', s.storage, typeof s.storage === 'boolean' ? (s.storage ? 'on' : 'off') : fmtNum(s.storage));
    const rows = [];
    for (const sh of Array.isArray(s.shards) ? s.shards : []) {
      const tr = el('tr');
      tr.append(
        el('td', '', fmtNum(sh.shard)),
        el('td', '', fmtNum(sh.connections)),
        el('td', '', fmtNum(sh.messagesIn)),
        el('td', '', fmtNum(sh.messagesOut)),
      );
      rows.push(tr);
    }
    $('shardRows').replaceChildren(...rows);
  }

  async function pollStatus() {
    clearTimeout(statusTimer);
    if (statusBusy) { statusAgain = true; return; }
    statusBusy = true;
    const box = $('statusError');
    try {
      const s = await api('GET', '/api/status');
      renderStatus(s && typeof s === 'object' ? s : {});
      box.hidden = true;
      box.textContent = '';
      $('status').classList.remove('stale');
      $('statusUpdated').textContent = clock().slice(0, 8);
    } catch (e) {
      box.textContent = `GET /api/status: ${e.message}`;
      box.hidden = false;
      $('status').classList.add('stale');
    } finally {
      statusBusy = false;
      if (statusAgain) {
        statusAgain = false;
        pollStatus();
      } else {
        statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
      }
    }
  }

  // ---------- wiring ----------

  function submitOnCtrlEnter(textareaId, formId) {
    $(textareaId).addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        $(formId).requestSubmit();
      }
    });
  }

  function init() {
    restoreInputs();
    $('url').value = location.origin.startsWith('http') ? location.origin : 'http://127.0.0.1:8080';
    $('url').placeholder = $('url').value;

    $('connForm').addEventListener('submit', (ev) => { ev.preventDefault(); connect(); });
    $('disconnect').addEventListener('click', disconnect);
    $('mintToken').addEventListener('click', mintToken);

    $('subForm').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const c = channelInput('channel');
      if (c !== null) sendObj({ type: 'subscribe', channel: c });
    });
    $('unsubscribe').addEventListener('click', () => {
      const c = channelInput('channel');
      if (c !== null) sendObj({ type: 'unsubscribe', channel: c });
    });
    $('presence').addEventListener('click', () => {
      const c = channelInput('channel');
      if (c !== null) request('presence', { channel: c });
    });

    $('pubForm').addEventListener('submit', (ev) => { ev.preventDefault(); publishWs(); });
    $('publishApi').addEventListener('click', publishApi);
    $('sendForm').addEventListener('submit', (ev) => { ev.preventDefault(); sendWs(); });
    $('sendApi').addEventListener('click', sendApi);
    $('broadcastWs').addEventListener('click', broadcastWs);

    $('rawForm').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = $('raw').value.trim();
      if (t) send(t);
    });
    $('whoami').addEventListener('click', () => request('whoami'));
    $('ping').addEventListener('click', () => sendObj({ type: 'ping' }));
    submitOnCtrlEnter('pubData', 'pubForm');
    submitOnCtrlEnter('sendData', 'sendForm');
    submitOnCtrlEnter('raw', 'rawForm');

    $('filter').addEventListener('input', () => {
      for (const e of log().children) e.hidden = !matches(e);
      updateCount();
    });
    $('clear').addEventListener('click', () => {
      log().replaceChildren();
      received = 0;
      updateCount();
    });

    // A new server or key: ask for the status now.
    $('url').addEventListener('change', pollStatus);
    $('apiKey').addEventListener('change', () => { rememberInputs(); pollStatus(); });

    setState('disconnected');
    renderSubs();
    updateCount();
    pollStatus();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
