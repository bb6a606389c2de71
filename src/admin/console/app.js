// Tributary's web console: one small ES module, no framework and no build step. It polls
// the admin JSON API (/api/v1/...) and renders with DOM calls only (never innerHTML with
// data, so a queue or client named "<script>" stays text).

const TOKEN_KEY = 'tributary.core_token';
const HISTORY = 90; // chart points kept (one per overview poll)

// ---- DOM helpers -------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

function table(testid, headers, rows) {
  return h('table', { 'data-testid': testid },
    h('thead', {}, h('tr', {}, headers.map(([label, num]) => h('th', { class: num ? 'num' : '' }, label)))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: headers.length, class: 'muted' }, 'none'))));
}

const num = (v, cls = '') => h('td', { class: `num ${cls}`.trim() }, v === null || v === undefined ? '–' : fmt(v));

function fmt(n) {
  if (typeof n !== 'number') return String(n);
  return Number.isInteger(n) ? n.toLocaleString('en') : n.toFixed(1);
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function banner(text, error = false) {
  const b = document.getElementById('banner');
  b.textContent = text;
  b.className = error ? 'error' : '';
  b.hidden = !text;
}

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.error;
  }
}

async function api(path, options = {}) {
  const headers = { Accept: 'application/json', ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, { ...options, headers });
  const text = await res.text();
  let body = {};
  try { body = text ? JSON.parse(text) : {}; } catch { body = { message: text }; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

// Asks for the token in the page's form; resolves with it, or null when cancelled.
function askToken(reason) {
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  form.hidden = false;
  banner(reason, true);
  input.value = '';
  input.focus();
  return new Promise((resolve) => {
    const done = (value) => {
      form.hidden = true;
      form.removeEventListener('submit', onSubmit);
      document.getElementById('token-cancel').removeEventListener('click', onCancel);
      resolve(value);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const t = input.value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      done(t || null);
    };
    const onCancel = () => done(null);
    form.addEventListener('submit', onSubmit);
    document.getElementById('token-cancel').addEventListener('click', onCancel);
  });
}

// A call that may need the token: on 401 ask for it and retry once; a 403 (the server has
// no token at all) is shown as it is, since no token typed here would help.
async function withToken(path, options) {
  try {
    return await api(path, options);
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 401) throw e;
    sessionStorage.removeItem(TOKEN_KEY);
    const token = await askToken(`${e.message}.`);
    if (!token) throw e;
    return api(path, options);
  }
}

// ---- pages -------------------------------------------------------------------------------

const state = {
  samples: [], // overview polls: { t, protocols: { name: { messages_in, ... } } }
  browse: null, // { namespace, name, messages } of the queue being browsed
};

// Per second between consecutive polls: messages and bytes from and to clients, summed over
// the protocols, and per protocol ({ protocol: { messages_in, ... } }). A counter that went
// down (a restart) counts as 0.
function rates() {
  const out = [];
  const s = state.samples;
  const keys = ['messages_in', 'bytes_in', 'messages_out', 'bytes_out'];
  for (let i = 1; i < s.length; i++) {
    const dt = (s[i].t - s[i - 1].t) / 1000;
    if (dt <= 0) continue;
    const per = {};
    const sum = { msgIn: 0, bytesIn: 0, msgOut: 0, bytesOut: 0 };
    for (const [name, now] of Object.entries(s[i].protocols)) {
      const before = s[i - 1].protocols[name] || {};
      per[name] = {};
      for (const k of keys) per[name][k] = Math.max(0, (now[k] - (before[k] || 0)) / dt);
      sum.msgIn += per[name].messages_in;
      sum.bytesIn += per[name].bytes_in;
      sum.msgOut += per[name].messages_out;
      sum.bytesOut += per[name].bytes_out;
    }
    out.push({ t: s[i].t, per, ...sum });
  }
  return out;
}

function chart(testid, title, points, series, unit) {
  const W = 420, H = 140, P = 28;
  const max = Math.max(1, ...points.flatMap((p) => series.map((s) => p[s.key])));
  const root = svg('svg', { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
  root.append(svg('line', { x1: P, y1: H - P, x2: W - 4, y2: H - P, stroke: '#d8dde5' }));
  const label = svg('text', { x: 2, y: 12, 'font-size': 10, fill: '#5b6575' });
  label.textContent = `${fmt(Math.round(max))} ${unit}`;
  root.append(label);
  for (const s of series) {
    const pts = points.map((p, i) => {
      const x = P + (i / Math.max(1, HISTORY - 2)) * (W - P - 4);
      const y = H - P - (p[s.key] / max) * (H - P - 16);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (pts.length) root.append(svg('polyline', { points: pts.join(' '), class: `line ${s.color}` }));
  }
  const last = points[points.length - 1];
  return h('div', { class: 'chart', 'data-testid': testid },
    h('strong', {}, title), root,
    // Colours come from classes in style.css: the CSP allows no inline style.
    h('div', { class: 'legend' }, series.map((s) => h('span', {}, h('i', { class: s.color }),
      `${s.label}: ${last ? fmt(Math.round(last[s.key])) : 0} ${unit}`))));
}

async function overviewPage() {
  const o = await api('/api/v1/overview');
  document.getElementById('version').textContent = `v${o.version}`;
  state.samples.push({ t: o.time_ms, protocols: Object.fromEntries(o.protocols.map((p) => [p.protocol, p])) });
  if (state.samples.length > HISTORY) state.samples.shift();
  const r = rates();
  const last = r[r.length - 1];
  const card = (k, v) => h('div', { class: 'card', 'data-testid': `count-${k}` }, h('div', { class: 'v' }, fmt(v)), h('div', { class: 'k' }, k.replace('_', ' ')));
  const t = o.totals;
  return [
    h('div', { class: 'cards' }, Object.entries(o.counts).map(([k, v]) => card(k, v)),
      h('div', { class: 'card' }, h('div', { class: 'v' }, bytes(o.storage_bytes)), h('div', { class: 'k' }, 'stream storage'))),
    h('h2', {}, 'Rates'),
    h('div', { class: 'charts' },
      chart('chart-messages', 'Messages per second', r, [
        { key: 'msgIn', label: 'in', color: 'c1' },
        { key: 'msgOut', label: 'out', color: 'c2' },
      ], 'msg/s'),
      chart('chart-bytes', 'Bytes per second', r, [
        { key: 'bytesIn', label: 'in', color: 'c3' },
        { key: 'bytesOut', label: 'out', color: 'c4' },
      ], 'B/s')),
    h('h2', {}, 'Per protocol'),
    table('protocols', [['Protocol'], ['In now (msg/s)', 1], ['Out now (msg/s)', 1], ['Messages in', 1], ['Messages out', 1], ['Bytes in', 1], ['Bytes out', 1]],
      o.protocols.map((p) => {
        const now = last && last.per[p.protocol];
        return h('tr', { 'data-protocol': p.protocol }, h('td', {}, p.protocol),
          num(now ? Math.round(now.messages_in) : null), num(now ? Math.round(now.messages_out) : null),
          num(p.messages_in, 'messages-in'), num(p.messages_out, 'messages-out'), num(p.bytes_in), num(p.bytes_out));
      })),
    h('p', { class: 'muted' }, `Since start: stream records in ${fmt(t.stream_records_in)}, out ${fmt(t.stream_records_out)} · queue messages enqueued ${fmt(t.queue_enqueued)}, dead-lettered ${fmt(t.queue_dead_lettered)} · refused requests ${fmt(t.auth_refusals)}`),
    h('h2', {}, 'Connections per listener'),
    table('listeners', [['Listener'], ['Open', 1], ['Accepted', 1]],
      o.listeners.map((l) => h('tr', {}, h('td', {}, l.listener), num(l.connections), num(l.accepted)))),
  ];
}

async function streamsPage() {
  const { streams } = await api('/api/v1/streams');
  return [h('h2', {}, 'Streams and topics'),
    table('streams', [['Namespace'], ['Stream'], ['Partition', 1], ['Start offset', 1], ['End offset', 1], ['Messages', 1], ['Size', 1]],
      streams.flatMap((s) => s.partition_info.map((p) => h('tr', { 'data-stream': `${s.namespace}/${s.name}`, 'data-partition': p.partition },
        h('td', {}, s.namespace), h('td', {}, s.name), num(p.partition), num(p.start_offset),
        num(p.end_offset, 'end-offset'), num(p.end_offset - p.start_offset), h('td', { class: 'num' }, bytes(p.size_bytes))))))];
}

async function groupsPage() {
  const { groups } = await api('/api/v1/groups');
  return [h('h2', {}, 'Consumer groups'),
    table('groups', [['Namespace'], ['Group'], ['State'], ['Stream'], ['Partition', 1], ['Committed', 1], ['End', 1], ['Lag', 1]],
      groups.flatMap((g) => (g.offsets.length ? g.offsets : [null]).map((o) => h('tr', { 'data-group': `${g.namespace}/${g.group}` },
        h('td', {}, g.namespace), h('td', {}, g.group), h('td', {}, g.state),
        h('td', {}, o ? o.stream : '–'), num(o && o.partition), num(o && o.committed_offset),
        num(o && o.end_offset), num(o ? o.lag : g.lag, 'lag')))))];
}

async function queueAction(q, action) {
  const path = `/api/v1/queues/${encodeURIComponent(q.namespace)}/${encodeURIComponent(q.name)}/${action}`;
  if (action === 'purge' && !window.confirm(`Purge every ready message of ${q.namespace}/${q.name}?`)) return;
  try {
    const r = await withToken(path, { method: 'POST' });
    banner(action === 'purge'
      ? `Purged ${r.purged} message(s) from ${q.name}.`
      : `Redrive of ${q.name} started: ${r.to_move ?? '?'} message(s) to move (task ${r.task_id}).`);
  } catch (e) {
    banner(`${action} of ${q.name} refused: ${e.message}`, true);
  }
  refresh();
}

async function browse(q) {
  try {
    const path = `/api/v1/queues/${encodeURIComponent(q.namespace)}/${encodeURIComponent(q.name)}/messages?max=20`;
    const { messages } = await api(path);
    state.browse = { namespace: q.namespace, name: q.name, messages };
  } catch (e) {
    banner(`Cannot browse ${q.name}: ${e.message}`, true);
  }
  refresh();
}

async function queuesPage() {
  const { queues } = await api('/api/v1/queues');
  const rows = queues.map((q) => h('tr', { 'data-queue': `${q.namespace}/${q.name}` },
    h('td', {}, q.namespace),
    h('td', {}, q.name, q.is_dead_letter_queue ? h('span', { class: 'tag' }, 'dead letters') : null),
    num(q.ready, 'ready'), num(q.leased, 'leased'), num(q.delayed, 'delayed'), num(q.consumers, 'consumers'),
    num(q.dead_letters, 'dead-letters'),
    h('td', {}, q.dead_letter_queues.join(', ') || '–'),
    h('td', {},
      h('button', { onclick: () => browse(q), 'data-action': 'browse' }, 'Browse'), ' ',
      h('button', { onclick: () => queueAction(q, 'redrive'), 'data-action': 'redrive', title: 'Move every message back to the queue it was dead-lettered from' }, 'Redrive'), ' ',
      h('button', { class: 'danger', onclick: () => queueAction(q, 'purge'), 'data-action': 'purge' }, 'Purge'))));
  const out = [h('h2', {}, 'Queues'),
    table('queues', [['Namespace'], ['Queue'], ['Ready', 1], ['In flight', 1], ['Delayed', 1], ['Consumers', 1], ['Dead letters', 1], ['Dead-letters to'], ['']], rows)];
  const b = state.browse;
  if (b) {
    out.push(h('h2', {}, `Messages of ${b.namespace}/${b.name} (head, not consumed)`),
      table('messages', [['Offset', 1], ['State'], ['Deliveries', 1], ['Routing key'], ['Dead-letter reason'], ['Value']],
        b.messages.map((m) => h('tr', {}, num(m.offset), h('td', {}, m.state), num(m.delivery_count),
          h('td', {}, m.properties.routing_key), h('td', {}, m.properties.dead_letter_reason || '–'),
          h('td', {}, h('pre', { class: 'value' }, m.value_encoding === 'base64' ? `(base64) ${m.value}` : m.value))))));
  }
  const { redrives } = await api('/api/v1/redrives');
  if (redrives.length) {
    out.push(h('h2', {}, 'Redrives'),
      table('redrives', [['Source'], ['Destination'], ['Status'], ['Moved', 1], ['To move', 1]],
        redrives.map((r) => h('tr', {}, h('td', {}, `${r.namespace}/${r.source}`), h('td', {}, r.destination || '(each message\'s source)'),
          h('td', { class: 'status' }, r.status + (r.failure_reason ? `: ${r.failure_reason}` : '')), num(r.moved), num(r.to_move)))));
  }
  return out;
}

async function sessionsPage() {
  const { sessions } = await api('/api/v1/sessions');
  return [h('h2', {}, 'MQTT sessions'),
    table('sessions', [['Namespace'], ['Client id'], ['Connected'], ['Expiry'], ['Subscriptions'], ['In flight', 1], ['Queued', 1]],
      sessions.map((s) => h('tr', { 'data-client': s.client_id },
        h('td', {}, s.namespace), h('td', {}, s.client_id), h('td', {}, s.connected ? 'yes' : 'no'),
        h('td', {}, s.expiry_ms === -1 ? 'never' : s.expiry_ms === 0 ? 'with connection' : `${s.expiry_ms / 1000} s`),
        h('td', { class: 'subscriptions' }, s.subscriptions.map((x) => `${x.filter} (QoS ${x.qos})`).join(', ') || '–'),
        num(s.inflight), num(s.queued, 'queued'))))];
}

async function closeConnection(c) {
  const who = c.client_id || c.peer;
  if (!window.confirm(`Close connection ${c.id} (${c.listener}, ${who})?`)) return;
  try {
    const r = await withToken(`/api/v1/connections/${encodeURIComponent(c.id)}/close`, { method: 'POST' });
    banner(r.ended ? `Closed connection ${c.id} (${who}).` : `Asked connection ${c.id} to close; it had not ended yet.`);
  } catch (e) {
    banner(`Close of connection ${c.id} refused: ${e.message}`, true);
  }
  refresh();
}

async function connectionsPage() {
  const { connections } = await api('/api/v1/connections');
  return [h('h2', {}, 'Client connections'),
    h('p', { class: 'muted' }, 'This process\'s gateway listeners. Close ends a connection the way its protocol\'s brokers do: AMQP connection.close 320, MQTT 5 DISCONNECT 0x98, Kafka closes the socket.'),
    table('connections', [['Id', 1], ['Listener'], ['Peer'], ['TLS'], ['User'], ['Client'], ['Namespace'], ['Connected since'], ['']],
      connections.map((c) => h('tr', { 'data-connection': c.id, 'data-client': c.client_id || '' },
        num(c.id), h('td', {}, c.listener), h('td', {}, c.peer), h('td', {}, c.tls ? 'yes' : 'no'),
        h('td', {}, c.user || '–'), h('td', { class: 'client' }, c.client_id || '–'), h('td', {}, c.namespace || '–'),
        h('td', {}, new Date(c.connected_at_ms).toLocaleString('en')),
        h('td', {}, h('button', { class: 'danger', onclick: () => closeConnection(c), 'data-action': 'close', disabled: c.closing },
          c.closing ? 'Closing…' : 'Close')))))];
}

async function exchangesPage() {
  const { addresses } = await api('/api/v1/addresses');
  return [h('h2', {}, 'Exchanges and addresses'),
    table('exchanges', [['Namespace'], ['Name'], ['Kind'], ['Durable'], ['Bindings']],
      addresses.map((a) => h('tr', { 'data-exchange': `${a.namespace}/${a.name}` },
        h('td', {}, a.namespace), h('td', {}, a.name || '(default)'), h('td', {}, a.kind), h('td', {}, a.durable ? 'yes' : 'no'),
        h('td', { class: 'bindings' }, a.bindings.map((b) => `${b.pattern || '(any)'} → ${b.destination_kind} ${b.destination}`).join('; ') || '–'))))];
}

async function usersPage() {
  const { users } = await api('/api/v1/users');
  return [h('h2', {}, 'Users'),
    h('p', { class: 'muted' }, 'From the configuration file ([[users]]) and kept in the core (tributary users, Kafka AlterUserScramCredentials); credentials are never shown.'),
    table('users', [['Name'], ['Source'], ['Mechanisms'], ['Namespaces']], users.map((u) => h('tr', { 'data-user': u.name },
      h('td', {}, u.name), h('td', {}, u.source || 'config'),
      h('td', {}, (u.mechanisms || []).join(', ') || '–'), h('td', {}, (u.namespaces || []).join(', ') || '–'))))];
}

const PAGES = {
  overview: [overviewPage, 1000],
  streams: [streamsPage, 2000],
  groups: [groupsPage, 2000],
  queues: [queuesPage, 2000],
  sessions: [sessionsPage, 2000],
  connections: [connectionsPage, 2000],
  exchanges: [exchangesPage, 2000],
  users: [usersPage, 5000],
};

// ---- routing and refresh -----------------------------------------------------------------

let timer = null;
let generation = 0;

function currentPage() {
  const name = location.hash.replace(/^#\/?/, '') || 'overview';
  return PAGES[name] ? name : 'overview';
}

async function refresh() {
  clearTimeout(timer);
  const gen = ++generation;
  const name = currentPage();
  const [render, every] = PAGES[name];
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.getAttribute('href') === `#/${name}`);
  }
  try {
    const content = await render();
    if (gen !== generation) return; // a newer refresh owns the page
    const main = document.getElementById('main');
    main.replaceChildren(...content);
    main.dataset.page = name;
    main.dataset.loaded = String(Date.now());
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof ApiError && e.status === 401 && document.getElementById('token-form').hidden) {
      // Reads need the token here (the listener is beyond loopback).
      const token = await askToken(`${e.message}.`);
      if (token) return refresh();
    }
    banner(`Cannot load ${name}: ${e.message}`, true);
  }
  timer = setTimeout(refresh, every);
}

window.addEventListener('hashchange', () => {
  state.browse = null;
  banner('');
  refresh();
});
refresh();
