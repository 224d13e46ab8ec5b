// weir's live dashboard. Reads GET /v1/routes every 2 s and GET /v1/history and /v1/audit every
// 5 s from the admin listener it was served by; changes routing only through the admin API, with
// the token the operator typed (kept in this variable, never stored), after a confirmation.
'use strict';

(() => {
  const ROUTES_EVERY_MS = 2000;
  const DETAIL_EVERY_MS = 5000;
  const TIMELINE_SHOWN = 8;
  const RECORDS_SHOWN = 12;
  const WINDOWS_SHOWN = 6;

  /** The admin token, only in memory: reloading the page forgets it. */
  let token = null;
  let routes = null;
  let history = null;
  let audit = null;
  /** GET /v1/fleet's answer, or {error} when etcd did not give it. */
  let fleetView = null;

  // === formatting for people ===

  /** A ratio (0..1) as a percentage: 0.005 -> "0.5%", 0.25 -> "25%". */
  function percent(ratio) {
    if (ratio === null || ratio === undefined || Number.isNaN(ratio)) return '–';
    const p = ratio * 100;
    if (p === 0 || p === 100) return `${p}%`;
    const digits = p < 1 ? 2 : p < 10 ? 1 : 0;
    return `${Number(p.toFixed(digits))}%`;
  }

  /** Basis points as a percentage: 50 -> "0.5%". */
  function basisPoints(bp) {
    return bp === null || bp === undefined ? '–' : percent(bp / 10000);
  }

  /** Milliseconds: 0.4 -> "400 µs", 12.3 -> "12 ms", 1530 -> "1.5 s". */
  function millis(ms) {
    if (ms === null || ms === undefined) return '–';
    if (ms < 1) return `${Math.round(ms * 1000)} µs`;
    if (ms < 10) return `${Number(ms.toFixed(1))} ms`;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    return `${Number((ms / 1000).toFixed(1))} s`;
  }

  /** A count: 950 -> "950", 3240 -> "3.2k", 1250000 -> "1.3M". */
  function count(n) {
    if (n === null || n === undefined) return '–';
    if (n < 1000) return `${Number(n.toFixed(n < 10 && n % 1 ? 1 : 0))}`;
    if (n < 1e6) return `${Number((n / 1e3).toFixed(1))}k`;
    return `${Number((n / 1e6).toFixed(1))}M`;
  }

  function rate(perSecond) {
    return perSecond === null || perSecond === undefined ? '–' : `${count(perSecond)} req/s`;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  // === DOM helpers (text only: nothing from the API is parsed as HTML) ===

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === false || v === null || v === undefined) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c);
    return node;
  }

  /** A status word with its colour: the word carries the meaning, the colour only helps. */
  function badge(word, kind) {
    return el('span', { class: `badge badge-${kind}`, text: word });
  }

  const STATE_KIND = { stable: 'ok', canary: 'info', paused: 'warn', rolled_back: 'bad' };
  const DECISION_KIND = { advance: 'ok', promote: 'ok', hold: 'warn', rollback: 'bad' };

  // === the admin API ===

  async function getJson(path) {
    const r = await fetch(path, { cache: 'no-store' });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  /**
   * Sends one change the way `weir admin` does: the method and path of the admin API, a JSON
   * body with a reason, and the token as a Bearer header (none without a token: the API then
   * answers 401 like it does to anyone). Resolves to {status, body}.
   */
  async function send(route, action, body) {
    const path = action === 'weight'
      ? `/v1/routes/${encodeURIComponent(route)}/weight`
      : `/v1/routes/${encodeURIComponent(route)}/${action}`;
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await fetch(path, {
      method: action === 'weight' ? 'PUT' : 'POST',
      headers,
      body: JSON.stringify(Object.assign({ reason: 'from the weir dashboard' }, body || {})),
      cache: 'no-store',
      credentials: 'omit',
    });
    let answer = null;
    try { answer = await r.json(); } catch (_) { answer = null; }
    return { status: r.status, body: answer };
  }

  function notice(text, kind) {
    const n = $('notice');
    n.textContent = text;
    n.className = kind ? `notice notice-${kind}` : 'notice';
  }

  // === the token ===

  async function unlock(event) {
    event.preventDefault();
    const typed = $('token').value.trim();
    if (!typed) return notice('Type the admin token first.', 'warn');
    const r = await fetch('/v1/auth', { headers: { authorization: `Bearer ${typed}` }, cache: 'no-store', credentials: 'omit' });
    $('token').value = '';
    if (r.status !== 200) {
      token = null;
      notice(`The admin token was refused (HTTP ${r.status}); the page stays read-only.`, 'bad');
    } else {
      token = typed;
      const who = await r.json();
      notice(`Controls unlocked as ${who.actor}. Every change asks for confirmation and is audited.`, 'ok');
    }
    showControls();
  }

  function lock() {
    token = null;
    notice('Controls locked; the token is forgotten.', 'info');
    showControls();
  }

  function showControls() {
    const unlocked = token !== null;
    for (const c of document.querySelectorAll('.controls')) c.hidden = !unlocked;
    $('token-forget').hidden = !unlocked;
    $('token-unlock').textContent = unlocked ? 'Change token' : 'Unlock controls';
    document.body.classList.toggle('unlocked', unlocked);
  }

  // === confirmation ===

  let pending = null;

  function confirmChange(route, action, body, text) {
    pending = { route, action, body };
    $('confirm-title').textContent = `${action === 'weight' ? 'Set weight' : action} on route ${route}?`;
    $('confirm-text').textContent = text;
    $('confirm').showModal();
    $('confirm-no').focus();
  }

  async function confirmed() {
    const p = pending;
    pending = null;
    $('confirm').close();
    if (!p) return;
    const r = await send(p.route, p.action, p.body);
    if (r.status === 200) {
      const route = r.body && r.body.route;
      const state = route ? `${route.state}, weight ${route.weight_percent}` : 'done';
      notice(`${p.action} on ${p.route}: ${r.body.changed ? 'applied' : 'nothing to change'} (generation ${r.body.generation}, ${state}).`, 'ok');
    } else {
      const why = r.body && r.body.error ? r.body.error : `HTTP ${r.status}`;
      if (r.status === 401) {
        // The token no longer works (weir restarted with another, say): back to read-only.
        token = null;
        showControls();
      }
      notice(`${p.action} on ${p.route} refused (HTTP ${r.status}): ${why}`, 'bad');
    }
    refreshRoutes();
    refreshDetail();
  }

  function describe(route, action, weight) {
    const stable = route.stable;
    const candidate = route.candidate || 'no candidate';
    switch (action) {
      case 'promote': return `Promote ${candidate} to stable on route ${route.name}, replacing ${stable} (kept as the rollback target).`;
      case 'rollback': return route.candidate && route.state !== 'rolled_back'
        ? `Roll back route ${route.name}: candidate ${candidate} goes to 0%, stable ${stable} serves everything.`
        : `Roll back route ${route.name}: ${route.rollback_target || 'the previous stable'} becomes stable again instead of ${stable}.`;
      case 'pause': return `Pause the canary of route ${route.name} at ${route.weight_percent} (stable ${stable}, candidate ${candidate}).`;
      case 'resume': return `Resume the canary of route ${route.name} from ${route.weight_percent} (stable ${stable}, candidate ${candidate}).`;
      default: return `Set route ${route.name} to send ${weight} to candidate ${candidate} and the rest to stable ${stable}.`;
    }
  }

  function controls(route) {
    const box = el('div', { class: 'controls', hidden: token === null });
    const button = (action, label, enabled) => {
      // An id per button, so the redraw every 2 s gives keyboard focus back to it.
      const b = el('button', { type: 'button', id: `${action}-${route.name}`, 'data-route': route.name, 'data-action': action, text: label, disabled: !enabled });
      b.addEventListener('click', () => confirmChange(route.name, action, null, describe(route, action)));
      return b;
    };
    const hasCandidate = route.candidate !== null;
    box.append(
      button('promote', 'Promote', hasCandidate),
      // What the API rolls back: a running canary, else the last promotion (409 when neither).
      button('rollback', 'Roll back', (hasCandidate && route.state !== 'rolled_back') || Boolean(route.rollback_target)),
      route.paused ? button('resume', 'Resume', true) : button('pause', 'Pause', true),
    );
    const id = `weight-${route.name}`;
    const input = el('input', { id, type: 'text', inputmode: 'decimal', size: 6, value: route.weight_percent, 'data-route': route.name });
    const set = el('button', { type: 'button', id: `set-weight-${route.name}`, 'data-route': route.name, 'data-action': 'weight', text: 'Set weight', disabled: !hasCandidate });
    set.addEventListener('click', () => {
      const weight = input.value.trim();
      confirmChange(route.name, 'weight', { weight }, describe(route, 'weight', weight));
    });
    box.append(el('label', { for: id, text: 'Weight' }), input, set);
    return box;
  }

  // === charts ===

  const SERIES_CLASSES = ['series-a', 'series-b', 'series-c', 'series-d'];
  const W = 240;
  const H = 70;

  /**
   * A small line chart of `lines` ([{label, points: [[t, v]]}]) over the time the samples cover
   * (one minute at least, the last 15 at most), with its latest values written out beside it:
   * the chart is decoration, the text is the reading.
   */
  function chart(title, lines, format, now) {
    const first = Math.min(...lines.flatMap((l) => l.points.map((p) => p[0])), now);
    const span = Math.min(Math.max(now - first, 60 * 1000), 15 * 60 * 1000);
    const values = lines.flatMap((l) => l.points.map((p) => p[1])).filter((v) => v !== null);
    const highest = Math.max(...values, 0);
    const top = highest || 1;
    const figure = el('figure', { class: 'chart' });
    const minutes = Math.round(span / 60000);
    const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}, last ${minutes} minute${minutes === 1 ? '' : 's'}` });
    plot.append(svg('line', { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: 'axis' }));
    lines.forEach((line, i) => {
      const path = [];
      for (const [t, v] of line.points) {
        if (v === null) continue;
        const x = Math.max(0, W - ((now - t) / span) * W);
        const y = H - 2 - (v / top) * (H - 6);
        path.push(`${path.length ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`);
      }
      if (path.length) plot.append(svg('path', { d: path.join(' '), class: `line ${SERIES_CLASSES[i % 4]}` }));
    });
    const legend = el('ul', { class: 'legend' }, lines.map((line, i) => {
      const last = [...line.points].reverse().find((p) => p[1] !== null);
      return el('li', { class: SERIES_CLASSES[i % 4] }, el('span', { class: 'swatch', 'aria-hidden': 'true' }), `${line.label}: ${last ? format(last[1]) : '–'}`);
    }));
    const caption = values.length ? `${title}, last ${minutes} min (max ${format(highest)})` : `${title} (no data yet)`;
    figure.append(el('figcaption', { text: caption }), plot, legend);
    return figure;
  }

  function charts(route) {
    const entry = history && history.routes.find((r) => r.route === route.name);
    if (!entry) return el('p', { class: 'muted', text: 'Charts appear after the first samples (every 5 s).' });
    const now = Date.now();
    const per = (f) => entry.versions.map((v) => ({
      label: `${v.version} (${v.role}${v.live ? '' : ', gone'})`,
      points: v.samples.map((s) => [s.at, f(s)]),
    }));
    const box = el('div', { class: 'charts' },
      chart('Request rate', per((s) => (s.seconds > 0 ? s.requests / s.seconds : null)), rate, now),
      chart('Error rate (5xx)', per((s) => (s.requests > 0 ? s.errors / s.requests : null)), percent, now),
      chart('p99 latency', per((s) => s.p99_ms), millis, now),
      chart('p99 time to first byte', per((s) => s.ttfb_p99_ms), millis, now),
    );
    if (entry.agreement.length) {
      const points = entry.agreement.map((a) => [a.at, a.ratio]);
      box.append(chart('Shadow agreement', [{ label: route.candidate || 'candidate', points }], percent, now));
    }
    return box;
  }

  // === a route ===

  function version(label, registry) {
    if (!label) return el('dd', { text: 'none' });
    const parts = [el('code', { text: label })];
    if (registry) {
      if (registry.digest) parts.push(' ', el('code', { class: 'digest', title: registry.digest, text: registry.digest.replace(/^sha256:/, '').slice(0, 12) }));
      if (registry.stage) parts.push(' ', badge(registry.stage, registry.stage === 'production' ? 'ok' : 'info'));
    }
    return el('dd', {}, parts);
  }

  function plan(route) {
    if (!route.plan) return el('p', { class: 'muted', text: 'No canary policy: the weight moves only by admin calls.' });
    const steps = route.plan.steps;
    let at = -1;
    steps.forEach((s, i) => { if (route.weight >= s) at = i; });
    const where = route.state === 'rolled_back' ? 'rolled back'
      : at < 0 ? 'before the first step' : `step ${at + 1} of ${steps.length}`;
    return el('div', { class: 'plan' },
      el('p', {}, `Canary plan, one analysis every ${millis(route.plan.interval_seconds * 1000)}: `, el('strong', { text: where })),
      el('ol', { class: 'steps' }, steps.map((s, i) => el('li', { class: i < at ? 'done' : i === at ? 'now' : 'next' },
        `${i + 1}. ${basisPoints(s)}`, i === at ? ' (now)' : i < at ? ' (passed)' : ''))),
    );
  }

  function gatesTable(gates) {
    if (!gates || !gates.length) return null;
    return el('table', { class: 'gates' },
      el('thead', {}, el('tr', {}, ['gate', 'result', 'observed', 'threshold', 'note'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, gates.map((g) => el('tr', {},
        el('td', { text: g.gate }),
        el('td', {}, badge(g.passed ? 'pass' : 'fail', g.passed ? 'ok' : 'bad')),
        el('td', { text: gateValue(g.gate, g.observed) }),
        el('td', { text: gateValue(g.gate, g.threshold) }),
        el('td', { text: g.note || '' }),
      ))));
  }

  function gateValue(gate, v) {
    if (v === null || v === undefined) return '–';
    if (typeof v !== 'number') return String(v);
    if (gate === 'error_rate' || gate === 'agreement' || gate === 'eval') return percent(v);
    return Number(v.toFixed(3)).toString();
  }

  /**
   * The route's canary decisions, newest first. A run of the same decision on the same version
   * at the same weight (a hold every interval while data comes in) is one entry: its latest
   * reason and evidence, how many times, and since when.
   */
  function decisions(route) {
    const records = (audit ? audit.recent : []).filter((r) => r.route === route.name && r.action === 'canary_decision').reverse();
    if (!records.length) {
      const last = route.canary;
      if (!last) return el('p', { class: 'muted', text: 'No canary decision yet.' });
      records.push({ time: null, after: last.evidence, reason: last.reason });
    }
    const runs = [];
    for (const r of records) {
      const d = r.after || {};
      const prev = runs[runs.length - 1];
      if (prev && prev.decision === d.decision && prev.version === d.version && prev.weight === d.weight) {
        prev.times += 1;
        prev.since = r.time;
      } else {
        runs.push({ record: r, decision: d.decision, version: d.version, weight: d.weight, times: 1, since: r.time });
      }
    }
    return el('ol', { class: 'timeline' }, runs.slice(0, TIMELINE_SHOWN).map((run) => {
      const r = run.record;
      const d = r.after || {};
      const repeated = run.times > 1 ? ` — ${run.times} times since ${clock(Date.parse(run.since))}` : '';
      return el('li', { class: 'decision' },
        el('p', {}, r.time ? el('time', { datetime: r.time, text: clock(Date.parse(r.time)) }) : null, ' ',
          badge(d.decision || 'decision', DECISION_KIND[d.decision] || 'info'), ' ',
          `${d.version || ''} at ${d.weight_percent || basisPoints(d.weight)}${repeated}`),
        el('p', { class: 'reason', text: r.reason || '' }),
        gatesTable(d.gates));
    }));
  }

  function evaluation(route) {
    const records = (audit ? audit.recent : []).filter((r) => r.route === route.name && r.action === 'canary_decision');
    let gate = null;
    for (const r of records) {
      const g = ((r.after || {}).gates || []).find((x) => x.gate === 'eval');
      if (g) gate = { gate: g, time: r.time };
    }
    if (!gate) return null;
    const g = gate.gate;
    const rows = (g.categories || []).map((c) => el('tr', {},
      el('td', { text: c.category }),
      el('td', { text: `${c.passed} of ${c.cases} (${percent(c.pass_rate)})` }),
      el('td', { text: percent(c.lower_bound) }),
      el('td', { text: percent(c.threshold) }),
      el('td', {}, badge(c.ok ? 'pass' : 'fail', c.ok ? 'ok' : 'bad'))));
    // A comparative evaluation judges each category against stable; a plain one the candidate's
    // pass rate alone.
    const what = g.compared
      ? `${g.candidate || 'the candidate'} compared with ${g.stable || 'stable'} on ${g.cases || 0} cases`
      : `${g.candidate || 'the candidate'}: ${g.passed_cases} of ${g.cases} cases passed (${percent(g.observed)}, ${percent(g.threshold)} needed)`;
    const when = gate.time ? `, at ${clock(Date.parse(gate.time))}` : '';
    return el('div', { class: 'eval' },
      el('h3', {}, 'Last held-out evaluation ', badge(g.passed ? 'passed' : 'failed', g.passed ? 'ok' : 'bad')),
      el('p', { class: 'muted', text: `${what}${when}${g.note ? `: ${g.note}` : ''}` }),
      rows.length ? el('table', { class: 'gates' },
        el('thead', {}, el('tr', {}, ['category', 'passed', 'lower bound', 'needed', 'result'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, rows)) : null);
  }

  function shadow(route) {
    if (!route.shadow) return null;
    const s = route.shadow;
    return el('p', {}, `Shadow: mirroring ${s.mirror_percent} of stable's requests to the candidate; agreement `,
      el('strong', { text: s.agreement === null ? 'not measured yet' : percent(s.agreement) }), ` over ${count(s.compared)} comparisons.`);
  }

  function routeCard(route) {
    const reg = route.registry || {};
    const card = el('article', { class: 'route', id: `route-${route.name}`, 'data-route': route.name, 'aria-labelledby': `title-${route.name}` },
      el('h2', { id: `title-${route.name}` }, `Route ${route.name} `, badge(route.state.replace('_', ' '), STATE_KIND[route.state] || 'info'),
        route.paused && route.state !== 'paused' ? badge('paused', 'warn') : null),
      el('dl', { class: 'versions' },
        el('dt', { text: 'Stable' }), version(route.stable, reg.stable),
        el('dt', { text: 'Candidate' }), version(route.candidate, reg.candidate),
        el('dt', { text: 'Weight' }), el('dd', {},
          el('meter', { min: 0, max: 10000, value: route.weight, 'aria-label': 'candidate weight' }), ' ',
          el('strong', { class: 'weight', text: route.weight_percent }), ' to the candidate')),
      plan(route),
      controls(route),
      shadow(route),
      el('h3', { text: 'Traffic per version' }),
      charts(route),
      evaluation(route),
      el('h3', { text: 'Canary decisions' }),
      decisions(route));
    return card;
  }

  // === fleet and audit ===

  function renderFleet() {
    const fleet = routes.fleet;
    $('fleet').hidden = !fleet;
    if (!fleet) return;
    const mine = el('p', {}, 'This replica, ', el('code', { text: fleet.replica }), ': ',
      badge(fleet.leader ? 'leader' : 'follower', fleet.leader ? 'ok' : 'info'), ' ',
      badge(`etcd ${fleet.etcd}`, fleet.etcd === 'connected' ? 'ok' : 'bad'), ' ',
      badge(`state ${fleet.state}`, fleet.state === 'current' ? 'ok' : 'bad'),
      ` (etcd prefix ${fleet.prefix}).`);
    let others;
    if (!fleetView) {
      others = el('p', { class: 'muted', text: 'Reading the other replicas from etcd…' });
    } else if (fleetView.error) {
      others = el('p', {}, badge('unknown', 'bad'), ` The other replicas cannot be read: ${fleetView.error}`);
    } else {
      const replicas = fleetView.fleet ? fleetView.fleet.replicas : [];
      others = el('table', {},
        el('caption', { text: 'Replicas with a live lease in etcd' }),
        el('thead', {}, el('tr', {}, ['replica', 'role', 'generation', 'routing state'].map((h) => el('th', { scope: 'col', text: h })))),
        el('tbody', {}, replicas.map((r) => el('tr', { 'data-replica': r.replica },
          el('td', {}, el('code', { text: r.replica }), r.this ? ' (this one)' : ''),
          el('td', {}, badge(r.leader ? 'leader' : 'follower', r.leader ? 'ok' : 'info')),
          el('td', { text: r.generation === null ? '–' : r.generation }),
          el('td', {}, badge(r.state, r.state === 'current' ? 'ok' : 'bad'))))));
    }
    $('fleet-body').replaceChildren(mine, others,
      el('p', { class: 'muted', text: 'A replica is listed while its lease in etcd is alive (it publishes its counters on it every half second); one that stopped drops out when the lease expires. The charts and the audit log on this page are this replica\'s own.' }));
  }

  function renderAudit() {
    if (!audit) return;
    const head = audit.head_checked ? ', ends at the head the state file records' : ' (no state-file head to check the tail against)';
    $('audit-state').replaceChildren(
      audit.intact ? badge('chain intact', 'ok') : badge('chain broken', 'bad'), ' ',
      audit.intact ? `${count(audit.records)} records${head}, checked ${audit.checked_seconds_ago < 1 ? 'just now' : `${millis(audit.checked_seconds_ago * 1000)} ago`}.` : audit.problem, ' ',
      el('code', { text: audit.file }));
    const windows = audit.recent.filter((r) => r.window).reverse().slice(0, WINDOWS_SHOWN);
    $('windows').replaceChildren(windows.length ? el('table', {},
      el('thead', {}, el('tr', {}, ['generation', 'from', 'to', 'served'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, windows.map((r) => el('tr', {},
        el('td', { text: r.window.generation }),
        el('td', { text: clock(Date.parse(r.window.start)) }),
        el('td', { text: clock(Date.parse(r.window.end)) }),
        el('td', { text: (r.window.served || []).map((s) => `${s.version} ${s.role} ${basisPoints(s.weight)}: ${count(s.requests)} requests, ${count(s.errors)} 5xx`).join('; ') }))))) :
      el('p', { class: 'muted', text: 'No serving window closed yet.' }));
    const records = audit.recent.slice().reverse().slice(0, RECORDS_SHOWN);
    $('audit-records').replaceChildren(el('table', {},
      el('thead', {}, el('tr', {}, ['seq', 'time', 'actor', 'action', 'route', 'reason'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, records.map((r) => el('tr', {},
        el('td', { text: r.seq }),
        el('td', { text: clock(Date.parse(r.time)) }),
        el('td', {}, el('code', { text: r.actor })),
        el('td', { text: r.action }),
        el('td', { text: r.route || '' }),
        el('td', { text: r.reason || '' }))))));
  }

  function render() {
    if (!routes) return;
    const focused = document.activeElement && document.activeElement.id;
    $('summary').textContent = `generation ${routes.generation} · ${routes.routes.length} route${routes.routes.length === 1 ? '' : 's'} · updated ${clock(Date.now())}`;
    $('routes').replaceChildren(...routes.routes.map(routeCard));
    renderFleet();
    renderAudit();
    showControls();
    if (focused && $(focused)) $(focused).focus();
  }

  // === polling ===

  async function refreshRoutes() {
    try {
      routes = await getJson('/v1/routes');
      document.body.classList.remove('offline');
      render();
    } catch (e) {
      document.body.classList.add('offline');
      $('summary').textContent = `cannot reach weir's admin API (${e.message}); retrying`;
    }
  }

  async function refreshDetail() {
    try {
      [history, audit] = await Promise.all([getJson('/v1/history'), getJson('/v1/audit?limit=100')]);
      if (routes && routes.fleet) {
        const r = await fetch('/v1/fleet', { cache: 'no-store' });
        const body = await r.json().catch(() => null);
        fleetView = r.ok ? body : { error: (body && body.error) || `HTTP ${r.status}` };
      }
      render();
    } catch (e) {
      $('summary').textContent = `cannot read the history or the audit log (${e.message}); retrying`;
    }
  }

  /** While the operator types a weight, a redraw would throw the text away: skip it. */
  function editing() {
    const a = document.activeElement;
    return a && a.tagName === 'INPUT' && a.id !== 'token' && a.value !== a.defaultValue;
  }

  function start() {
    $('token-form').addEventListener('submit', unlock);
    $('token-forget').addEventListener('click', lock);
    $('confirm-yes').addEventListener('click', confirmed);
    $('confirm-no').addEventListener('click', () => { pending = null; $('confirm').close(); });
    refreshRoutes().then(refreshDetail);
    setInterval(() => { if (!editing() && !$('confirm').open) refreshRoutes(); }, ROUTES_EVERY_MS);
    setInterval(() => { if (!editing() && !$('confirm').open) refreshDetail(); }, DETAIL_EVERY_MS);
  }

  // For the browser tests and the console: the page's own way of sending a change.
  window.weirDashboard = { send, hasToken: () => token !== null, format: { percent, basisPoints, millis, count, rate } };
  start();
})();
