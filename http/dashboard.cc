// The dashboard: one page, no external resources, polling /api/v1 once a second. With kilnd
// --tokens the page holds no data until it is given a token: it asks for one (or takes it from
// a "#token=..." fragment, which browsers never send to a server), keeps it in sessionStorage
// (this tab only, gone when it closes) and sends it as "Authorization: Bearer" with every
// request. No cookie, so no request is authorised by the browser on its own.

#include "http/http_server.h"

namespace kiln {

const char* DashboardHtml() {
  return R"html(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kiln</title>
<style>
  :root { --bg:#111418; --panel:#1a1f26; --text:#e6e6e6; --dim:#8b949e; --ok:#3fb950; --warn:#d29922; --bad:#f85149; --accent:#58a6ff; }
  body { margin:0; font:14px/1.45 system-ui, sans-serif; background:var(--bg); color:var(--text); }
  header { display:flex; gap:1rem; align-items:baseline; padding:.8rem 1.2rem; border-bottom:1px solid #30363d; }
  header h1 { font-size:1.1rem; margin:0; }
  header .dim { color:var(--dim); }
  main { padding:1rem 1.2rem; display:grid; gap:1rem; }
  section { background:var(--panel); border:1px solid #30363d; border-radius:6px; padding:.8rem 1rem; }
  h2 { font-size:1rem; margin:0 0 .4rem 0; display:flex; gap:.6rem; align-items:baseline; flex-wrap:wrap; }
  table { border-collapse:collapse; width:100%; }
  th, td { text-align:left; padding:.2rem .6rem .2rem 0; vertical-align:top; }
  th { color:var(--dim); font-weight:normal; }
  .pill { border-radius:1em; padding:0 .55em; font-size:.85em; border:1px solid currentColor; }
  .healthy, .true-Available, .completed { color:var(--ok); }
  .starting, .pending, .draining, .progressing, .waiting_promotion, .paused { color:var(--warn); }
  .unhealthy, .failed, .lost, .true-Degraded { color:var(--bad); }
  .terminated, .dim { color:var(--dim); }
  .bar { height:8px; background:#30363d; border-radius:4px; overflow:hidden; display:flex; width:240px; }
  .bar .new { background:var(--ok); } .bar .old { background:var(--accent); }
  .error { color:var(--bad); white-space:pre-wrap; }
  .address { font-family:ui-monospace, monospace; color:var(--accent); }
  .pool { margin-top:.5rem; } .pool h3 { font-size:.95rem; margin:.3rem 0; font-weight:normal; }
  .ep-active { color:var(--ok); } .ep-draining, .drain { color:var(--warn); } .ep-ejected { color:var(--bad); }
  .commit { font-family:ui-monospace, monospace; color:var(--accent); }
  .history { margin-top:.5rem; }
  #events td { font-family:ui-monospace, monospace; font-size:12px; }
  #login { display:flex; gap:.5rem; align-items:baseline; }
  #login[hidden], #signout[hidden] { display:none; }
  #login input { background:var(--panel); color:var(--text); border:1px solid #30363d; border-radius:4px; padding:.15rem .4rem; }
  button { background:var(--panel); color:var(--text); border:1px solid #30363d; border-radius:4px; cursor:pointer; }
</style>
</head>
<body>
<header><h1>kiln</h1><span class="dim" id="updated">loading…</span><span class="error" id="fetch-error"></span>
  <form id="login" hidden><label for="token">kilnd needs a token</label><input id="token" type="password" autocomplete="off" size="28"><button type="submit">sign in</button></form>
  <button id="signout" type="button" hidden>sign out</button></header>
<main>
  <section id="git" hidden></section>
  <section id="hosts" hidden></section>
  <div id="services"></div>
  <section><h2>Recent events</h2><table id="events"><thead><tr><th>seq</th><th>time</th><th>service</th><th>kind</th><th>instance</th><th>actor</th><th>message</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
const lower = (s, prefix) => String(s || "").replace(prefix, "").toLowerCase();
const age = (ms) => { ms = Number(ms); if (!ms) return "-"; const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? s + "s" : s < 7200 ? Math.round(s / 60) + "m" : Math.round(s / 3600) + "h"; };
const bytes = (n) => { n = Number(n) || 0; const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; ++i; } return (i ? n.toFixed(1) : n) + " " + u[i]; };
// "HOST:PORT", with an IPv6 literal in brackets.
const hostPort = (host, port) => (String(host).includes(":") ? `[${host}]` : host) + ":" + port;
const epState = { active: "in pool", draining: "draining", ejected: "ejected" };
let lastSeq = 0;
const events = [];
const tokenKey = "kiln-token";
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem(tokenKey, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
}
class NeedToken extends Error {}
async function api(path) {
  const token = sessionStorage.getItem(tokenKey);
  const r = await fetch(path, { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
  if (r.status === 401) {
    sessionStorage.removeItem(tokenKey);
    throw new NeedToken(token ? "the token was refused" : "");
  }
  $("#signout").hidden = !token;
  return r.json();
}
$("#login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(tokenKey, $("#token").value.trim());
  $("#token").value = "";
  $("#login").hidden = true;
  refresh();
});
$("#signout").addEventListener("click", () => {
  sessionStorage.removeItem(tokenKey);
  location.reload();
});

// The service's latest revisions: where each came from, with the git commit that last changed
// its manifest file (and "dirty" when the file had uncommitted changes).
function historyHtml(h) {
  const rows = (h.revisions || []).slice(0, 5).map((r) => {
    const c = r.commit;
    const commit = (c ? `<span class="commit" title="${esc(c.id)}">${esc(c.id.slice(0, 12))}</span> ${esc(c.subject)} <span class="dim">(${esc(c.author)})</span>` : "")
      + (r.manifest_dirty ? ` <span class="unhealthy dirty">dirty</span>` : "");
    const source = r.source === "rollback" ? `rollback to ${esc(r.rolled_back_from)} by ${esc(r.actor)}` : esc(r.manifest_file);
    return `<tr data-revision="${esc(r.number)}"><td>${esc(r.number)}</td><td>${esc(r.template ? r.template.version : "")}</td><td>${source}</td>
      <td>${commit || "-"}</td><td>${age(r.created_unix_ms)}</td></tr>`; }).join("");
  return `<table class="history"><thead><tr><th>revision</th><th>version</th><th>source</th><th>commit</th><th>created</th></tr></thead><tbody>${rows}</tbody></table>`;
}

// kilnd --manifests git+URL#BRANCH: the commit deployed, the commit seen at the last fetch, and
// what keeps them apart (a manifest error in the seen commit, a failed fetch).
function gitHtml(g) {
  const commit = (c) => c ? `<span class="commit" title="${esc(c.id)}">${esc(c.id.slice(0, 12))}</span> ${esc(c.subject)} <span class="dim">(${esc(c.author)})</span>` : "-";
  return `<h2>Git <span class="address">${esc(g.url)}#${esc(g.branch)}</span> <span class="dim">fetched ${age(g.last_fetch_unix_ms)} ago</span></h2>
    <div class="git-deployed">deployed: ${commit(g.deployed)}</div>
    <div class="git-seen">seen: ${commit(g.seen)}</div>
    ${g.manifest_error ? `<div class="error git-manifest-error">manifest error: ${esc(g.manifest_error)}</div>` : ""}
    ${g.fetch_error ? `<div class="error git-fetch-error">cannot fetch: ${esc(g.fetch_error)}; the last good state runs</div>` : ""}`;
}

// kilnd --docker-host: each Docker host, its health and the instances on it.
function hostsHtml(hosts) {
  const rows = hosts.map((h) => {
    const health = h.configured === false
      ? `<span class="error">not configured: ${esc(h.left_running || 0)} container(s) left running there</span>`
      : h.up ? `<span class="healthy">up</span>`
      : `<span class="error">down for ${age(h.since_unix_ms)}${h.last_error ? ": " + esc(h.last_error) : ""}</span>`;
    const by = Object.entries(h.instances_by_service || {}).sort().map(([s, n]) => `${esc(s)} ${esc(n)}`).join(", ");
    return `<tr data-host="${esc(h.name)}"><td>${esc(h.name)}</td><td>${esc(h.endpoint || "-")}</td><td class="host-health">${health}</td><td>${esc(h.instances || 0)}${by ? ` (${by})` : ""}</td></tr>`; }).join("");
  return `<h2>Docker hosts</h2><table class="hosts"><thead><tr><th>host</th><th>engine</th><th>health</th><th>instances</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function serviceHtml(s, h) {
  const sum = s.summary, r = s.rollout || {};
  const target = Number(sum.target_revision);
  let oldLive = 0, newLive = 0;
  for (const c of s.revisions || []) (Number(c.revision) === target ? (newLive += c.total) : (oldLive += c.total));
  const wanted = Math.max(sum.replicas, 1);
  const conds = (sum.conditions || []).map((c) =>
    `<tr><td class="${c.status ? "true-" + c.type : ""}">${esc(c.type)}</td><td>${c.status ? "True" : "False"}</td><td>${esc(c.reason)}</td><td>${esc(c.message)}</td></tr>`).join("");
  const inst = (s.instances || []).map((i) => {
    const st = lower(i.state, "INSTANCE_STATE_");
    return `<tr data-instance="${esc(i.id)}"><td>${esc(i.id)}</td><td>${esc(i.revision)}</td><td class="state ${st}">${st}</td>
      <td>${i.available ? "yes" : "no"}</td><td>${esc(i.port)}</td><td>${age(i.created_unix_ms)}</td>
      <td>${i.drain ? `<div class="drain">${esc(i.drain)}</div>` : ""}${esc(i.last_probe || i.reason)}</td></tr>`; }).join("");
  // The stable address and, per proxy that reported, its listener and the pool behind it.
  const address = sum.expose ? hostPort(sum.expose.host, sum.expose.port) : "";
  const routes = (s.proxy_routes || []).map((pr) => {
    const eps = (pr.endpoints || []).map((e) => {
      const st = lower(e.state, "PROXY_ENDPOINT_STATE_");
      return `<tr data-endpoint="${esc(e.instance)}"><td>${esc(e.instance)}</td><td>${esc(e.revision)}</td>
        <td class="ep-state ep-${esc(st)}">${esc(epState[st] || st)}</td><td>${esc(e.open_connections)}</td>
        <td>${esc(e.total_connections)}</td><td>${esc(e.connect_failures)}</td><td>${bytes(e.bytes_in)}</td><td>${bytes(e.bytes_out)}</td></tr>`; }).join("");
    const listener = pr.bind_error
      ? `<span class="error bind-error">cannot listen on ${esc(hostPort(pr.listen_host, pr.listen_port))}: ${esc(pr.bind_error)}</span>`
      : `<span class="listening">listening on <span class="address">${esc(hostPort(pr.listen_host, pr.bound_port))}</span></span>`;
    return `<div class="route" data-proxy="${esc(pr.proxy)}"><h3>Pool · proxy ${esc(pr.proxy)}: ${listener}
        ${Number(pr.rejected_connections) ? ` · <span class="unhealthy">${esc(pr.rejected_connections)} connections rejected (no instance took them)</span>` : ""}</h3>
      <table class="endpoints"><thead><tr><th>instance</th><th>revision</th><th>state</th><th>open</th><th>total</th><th>connect failures</th><th>bytes in</th><th>bytes out</th></tr></thead><tbody>${eps}</tbody></table></div>`; }).join("");
  return `<section class="service" data-service="${esc(sum.name)}">
    <h2>${esc(sum.name)} <span class="pill">version ${esc(sum.version)}</span>${address ? ` <span class="address">${esc(address)}</span>` : ""}
      <span class="dim">revision ${target} · manifest ${esc(sum.desired_revision)}${Number(sum.pinned_revision) ? ` · <span class="unhealthy pin">${esc(s.pin_status || "pinned to " + sum.pinned_revision)}</span>` : ""}${sum.paused ? " · paused" : ""}</span></h2>
    <div>rollout ${esc(r.from_revision || 0)} → ${esc(r.to_revision || target)}: <span class="rollout ${lower(r.state, "ROLLOUT_STATE_")}">${lower(r.state, "ROLLOUT_STATE_")}</span>
      ${r.reason ? `<span class="error">${esc(r.reason)}</span>` : ""}
      · <span class="progress">${sum.available}/${sum.replicas} available · ${newLive} new · ${oldLive} old</span>
      <div class="bar"><div class="new" style="width:${100 * Math.min(newLive, wanted) / wanted}%"></div><div class="old" style="width:${100 * Math.min(oldLive, wanted) / wanted}%"></div></div></div>
    ${sum.manifest_error ? `<div class="error manifest-error">manifest error: ${esc(sum.manifest_error)}</div>` : ""}
    <table class="conditions">${conds}</table>
    <table class="instances"><thead><tr><th>instance</th><th>revision</th><th>state</th><th>available</th><th>port</th><th>age</th><th>last probe</th></tr></thead><tbody>${inst}</tbody></table>
    ${address ? `<div class="pool">${routes || `<span class="dim no-proxy">Pool: no proxy has reported for ${esc(address)} yet</span>`}</div>` : ""}
    ${h ? historyHtml(h) : ""}
  </section>`;
}

async function refresh() {
  try {
    const list = await api("/api/v1/services");
    $("#git").hidden = !list.git;
    if (list.git) $("#git").innerHTML = gitHtml(list.git);
    $("#hosts").hidden = !(list.docker_hosts || []).length;
    if ((list.docker_hosts || []).length) $("#hosts").innerHTML = hostsHtml(list.docker_hosts);
    const details = await Promise.all((list.services || []).map((s) =>
      api("/api/v1/services/" + encodeURIComponent(s.name))));
    const histories = await Promise.all((list.services || []).map((s) =>
      api("/api/v1/services/" + encodeURIComponent(s.name) + "/history")));
    $("#services").innerHTML = details.map((d, i) => serviceHtml(d.service, histories[i])).join("") || "<section>no services</section>";
    const ev = await api("/api/v1/events?since=" + lastSeq);
    for (const e of ev.events || []) { events.unshift(e); lastSeq = Math.max(lastSeq, Number(e.seq)); }
    events.length = Math.min(events.length, 200);
    $("#events tbody").innerHTML = events.map((e) => `<tr><td>${esc(e.seq)}</td><td>${new Date(Number(e.time_unix_ms)).toLocaleTimeString()}</td>
      <td>${esc(e.service)}</td><td>${esc(e.kind)}</td><td>${esc(e.instance)}</td><td>${esc(e.actor)}</td><td>${esc(e.message)}</td></tr>`).join("");
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("#fetch-error").textContent = "";
  } catch (err) {
    if (err instanceof NeedToken) {
      $("#login").hidden = false;
      $("#services").innerHTML = "";
      $("#events tbody").innerHTML = "";
      $("#updated").textContent = "";
      $("#fetch-error").textContent = err.message;
      return;
    }
    $("#fetch-error").textContent = "cannot reach kilnd: " + err;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
)html";
}

}  // namespace kiln
