// Postroom webmail: folders, list, reading pane with conversations, compose, live push.
import * as api from "./api.js";
import { $, announce, badAddresses, h, longDate, parseAddress, shortDate, splitAddresses, toast } from "./dom.js";
import { Push } from "./push.js";
import { bodyView } from "./reader.js";

const ROLE_ORDER = ["inbox", "drafts", "sent", "archive", "junk", "trash"];

const state = {
  folders: [], current: null, query: null, rows: [], cursor: null, loading: false,
  selected: -1, open: null, push: null, loaded: false, listGeneration: 0,
};

// ------------------------------------------------------------------ sign in and out

function showSignIn(message) {
  if (state.push) { state.push.stop(); state.push = null; }
  $("#app").hidden = true;
  $("#compose").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message || "";
  document.title = "Sign in — Postroom";
  $("#signin-address").focus();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const address = $("#signin-address").value.trim();
  const password = $("#signin-password").value;
  $("#signin-error").textContent = "";
  if (!address || !password) { $("#signin-error").textContent = "Enter your address and password."; return; }
  try {
    await api.signIn(address, password);
    $("#signin-password").value = "";
    startApp();
  } catch (err) {
    $("#signin-error").textContent = err.status === 401 ? "Wrong address or password." : err.message;
  }
});

$("#signout-btn").addEventListener("click", async () => {
  await api.signOut();
  location.reload();
});

api.whenUnauthorized(() => { api.session.clear(); showSignIn("Your session has ended. Please sign in again."); });

function startApp() {
  const s = api.session.get();
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#who").textContent = s.address;
  state.loaded = false;
  state.push = new Push(s.token, {
    onFrame: onPush,
    onState: (st) => {
      const el = $("#live-state");
      el.textContent = st === "live" ? "live" : st;
      el.classList.toggle("on", st === "live");
    },
    onUnauthorized: () => { api.session.clear(); showSignIn("Your session has ended. Please sign in again."); },
  });
  state.push.start();
  // The list is read once the push channel is live, so no event can fall in between;
  // without a WebSocket (a proxy that refuses it) the page still works, just not live.
  setTimeout(() => { if (!state.loaded) initialLoad(); }, 2500);
  $("#list").focus();
}

async function initialLoad() {
  state.loaded = true;
  await loadFolders();
  const inbox = state.folders.find((f) => f.role === "inbox") || state.folders[0];
  if (inbox) await openFolder(inbox);
}

// ---------------------------------------------------------------------------- folders

function sortFolders(list) {
  const rank = (f) => (f.role && ROLE_ORDER.includes(f.role) ? ROLE_ORDER.indexOf(f.role) : 99);
  return [...list].sort((a, b) => rank(a) - rank(b) || a.name.localeCompare(b.name));
}

async function loadFolders() {
  const data = await api.folders();
  state.folders = sortFolders(data.folders);
  if (state.current) state.current = state.folders.find((f) => f.id === state.current.id) || null;
  renderFolders();
}

function renderFolders() {
  const ul = $("#folder-list");
  ul.replaceChildren();
  for (const f of state.folders) {
    const current = state.current && !state.query && f.id === state.current.id;
    const label = f.role ? f.role[0].toUpperCase() + f.role.slice(1) : f.name;
    const a = h("a", {
      href: `#folder/${encodeURIComponent(f.id)}`, "aria-current": current ? "page" : null,
      "data-folder": f.id,
      "aria-label": f.unread ? `${label}, ${f.unread} unread` : label,
      onclick: (event) => { event.preventDefault(); openFolder(f); closeMenu(); },
    }, h("span", {}, label),
    f.unread ? h("span", { class: "count", "aria-hidden": "true" }, String(f.unread)) : null);
    ul.append(h("li", {}, a));
  }
  const select = $("#move-select");
  select.replaceChildren(h("option", { value: "" }, "Move to…"),
    ...state.folders.map((f) => h("option", { value: f.id }, f.role ? f.role[0].toUpperCase() + f.role.slice(1) : f.name)));
  updateTitle();
}

function folderByRole(role) { return state.folders.find((f) => f.role === role); }
function folderName(f) { return f.role ? f.role[0].toUpperCase() + f.role.slice(1) : f.name; }

function updateTitle() {
  const inbox = folderByRole("inbox");
  const unread = inbox ? inbox.unread : 0;
  const where = state.query ? `Search: ${state.query}` : state.current ? folderName(state.current) : "Mail";
  document.title = `${unread ? `(${unread}) ` : ""}${where} — Postroom`;
}

$("#menu-btn").addEventListener("click", () => {
  const open = !$("#folders").classList.contains("open");
  $("#folders").classList.toggle("open", open);
  $("#menu-btn").setAttribute("aria-expanded", String(open));
  if (open) $("#folder-list a")?.focus();
});
function closeMenu() { $("#folders").classList.remove("open"); $("#menu-btn").setAttribute("aria-expanded", "false"); }

// ------------------------------------------------------------------------------ list

async function openFolder(folder) {
  state.current = folder;
  state.query = null;
  $("#search-input").value = "";
  $("#clear-search").hidden = true;
  $("#list-title").textContent = folderName(folder);
  renderFolders();
  await reloadList();
}

async function reloadList() {
  state.rows = [];
  state.cursor = null;
  state.selected = -1;
  state.listGeneration += 1;
  $("#list").replaceChildren();
  $("#list-end").textContent = "";
  await loadMore(true);
}

async function loadMore(first) {
  if (state.loading || (!first && !state.cursor)) return;
  state.loading = true;
  const generation = state.listGeneration;
  $("#list-end").textContent = "Loading…";
  let loaded = false;
  try {
    const page = state.query
      ? await api.search(state.query, state.cursor)
      : await api.listMessages(state.current.id, state.cursor);
    if (generation !== state.listGeneration) return;
    const items = state.query ? page.results : page.messages;
    for (const m of items) {
      if (state.rows.some((r) => r.id === m.id)) continue;
      state.rows.push(m);
      $("#list").append(rowView(m));
    }
    state.cursor = page.next_cursor;
    $("#list-end").textContent = state.rows.length === 0
      ? (state.query ? "Nothing matches." : "No messages here.")
      : state.cursor ? "" : `${state.rows.length} message${state.rows.length === 1 ? "" : "s"}`;
    if (state.selected < 0 && state.rows.length) select(0, false);
    loaded = true;
  } catch (err) {
    if (generation === state.listGeneration) {
      $("#list-end").textContent = err.code === "bad_query" || err.status === 400 ? `Search: ${err.message}` : `Could not load: ${err.message}`;
    }
  } finally {
    state.loading = false;
  }
  if (loaded) maybeLoadMore(); // still at the end (a tall window, a fast scroller): go on
}

// Cursor paging: the next page is fetched when the reader scrolls near the end of the list
// (the list is its own scroll box) or the rows loaded do not fill it yet, so a folder of
// 100,000 messages costs what the reader actually scrolls through.
function nearListEnd() {
  const list = $("#list");
  return list.scrollTop + list.clientHeight >= list.scrollHeight - 600;
}

function maybeLoadMore() {
  if (state.cursor && !state.loading && nearListEnd()) loadMore(false);
}

$("#list").addEventListener("scroll", maybeLoadMore, { passive: true });
window.addEventListener("resize", maybeLoadMore, { passive: true });

function rowView(m, fresh) {
  const from = parseAddress(m.from);
  const isSent = state.current && ["sent", "drafts"].includes(state.current.role) && !state.query;
  const who = isSent ? `To: ${splitAddresses(m.to).map((a) => parseAddress(a).name).join(", ")}` : from.name || "(unknown sender)";
  const star = h("button", {
    type: "button", class: `star${m.flagged ? " on" : ""}`, tabindex: "-1",
    "aria-label": m.flagged ? "Starred" : "Not starred", "aria-pressed": String(m.flagged),
    onclick: (event) => { event.stopPropagation(); setFlag(m, "flagged", !m.flagged); },
  }, m.flagged ? "★" : "☆");
  let snippet = h("span", { class: "snippet" }, m.snippet || "");
  if (m.highlight) snippet = h("span", { class: "snippet" }, ...highlighted(m.highlight));
  const li = h("li", {
    id: `row-${m.id}`, role: "option", class: `row${m.seen ? "" : " unread"}${fresh ? " new" : ""}`,
    "aria-selected": "false", "data-id": m.id,
    onclick: () => { select(state.rows.findIndex((r) => r.id === m.id), true); },
  },
  star,
  h("span", { class: "from" }, m.seen ? "" : h("span", { class: "sr-only" }, "Unread, "), who),
  h("span", { class: "date" }, m.has_attachments ? h("span", { class: "marks clip", title: "Has attachments" }, h("span", { class: "sr-only" }, "has attachments, ")) : null,
    h("time", { datetime: m.received_at }, shortDate(m.date || m.received_at))),
  h("span", { class: "subject" }, m.subject || "(no subject)"),
  snippet);
  return li;
}

// The search highlight is HTML with <mark> around matches; keep the text and the marks only.
function highlighted(html) {
  const doc = new DOMParser().parseFromString(`<div>${html}</div>`, "text/html");
  const out = [];
  for (const node of doc.body.firstChild.childNodes) {
    if (node.nodeType === Node.TEXT_NODE) out.push(node.textContent);
    else if (node.nodeName === "MARK") out.push(h("mark", {}, node.textContent));
    else out.push(node.textContent);
  }
  return out;
}

function updateRow(m) {
  const old = document.getElementById(`row-${m.id}`);
  if (!old) return;
  const fresh = rowView(m);
  fresh.setAttribute("aria-selected", old.getAttribute("aria-selected"));
  old.replaceWith(fresh);
}

function insertRow(m, fresh) {
  if (state.rows.some((r) => r.id === m.id)) { updateRow(m); return; }
  const at = state.rows.findIndex((r) => r.received_at < m.received_at);
  const index = at < 0 ? state.rows.length : at;
  if (at < 0 && state.cursor) return; // older than what is loaded: it will come with paging
  state.rows.splice(index, 0, m);
  const li = rowView(m, fresh);
  const list = $("#list");
  list.insertBefore(li, list.children[index] || null);
  if (state.selected >= index) state.selected += 1;
  if (state.selected < 0) select(0, false);
  $("#list-end").textContent = state.cursor ? "" : `${state.rows.length} message${state.rows.length === 1 ? "" : "s"}`;
}

function removeRow(id) {
  const index = state.rows.findIndex((r) => r.id === id);
  if (index < 0) return;
  state.rows.splice(index, 1);
  document.getElementById(`row-${id}`)?.remove();
  if (state.selected > index) state.selected -= 1;
  else if (state.selected === index) {
    state.selected = -1;
    if (state.rows.length) select(Math.min(index, state.rows.length - 1), state.open && state.open.id === id);
  }
  if (state.open && state.open.id === id && !state.rows.length) closeReader();
}

function select(index, open) {
  if (index < 0 || index >= state.rows.length) return;
  const list = $("#list");
  list.querySelector('[aria-selected="true"]')?.setAttribute("aria-selected", "false");
  state.selected = index;
  const li = document.getElementById(`row-${state.rows[index].id}`);
  if (li) {
    li.setAttribute("aria-selected", "true");
    list.setAttribute("aria-activedescendant", li.id);
    li.scrollIntoView({ block: "nearest" });
  }
  if (open) openMessage(state.rows[index]);
}

// ---------------------------------------------------------------------- reading pane

function closeReader() {
  state.open = null;
  $("#reader-body").hidden = true;
  $("#reader-empty").hidden = false;
  $("#app").classList.remove("reading");
}

async function openMessage(summary) {
  if (summary.draft && state.current && state.current.role === "drafts" && !state.query) {
    const detail = await api.message(summary.id);
    openCompose({ to: detail.to, cc: detail.cc, bcc: detail.bcc, subject: detail.subject,
      text: detail.text, draftId: detail.id });
    return;
  }
  const token = Symbol("open");
  state.openToken = token;
  const detail = await api.message(summary.id);
  if (state.openToken !== token) return;
  state.open = detail;
  $("#reader-empty").hidden = true;
  $("#reader-body").hidden = false;
  $("#app").classList.add("reading");
  updateActions();
  const thread = $("#thread");
  thread.replaceChildren(h("h2", { id: "thread-subject" }, detail.subject || "(no subject)"));
  const others = await conversation(detail);
  if (state.openToken !== token) return;
  for (const other of others) thread.append(collapsedView(other));
  thread.append(await messageView(detail, true));
  if (others.length) thread.lastChild.scrollIntoView({ block: "start" }); else $("#reader").scrollTop = 0;
  if (!detail.seen) {
    detail.seen = true;
    setFlag(summary, "seen", true);
  }
}

// The other messages of the conversation, oldest first, in every folder (Sent included):
// GET /v1/threads/{id}; the loaded list's rows of the same thread if that fails.
async function conversation(detail) {
  const found = new Map();
  if (detail.thread_id) {
    try {
      const thread = await api.thread(detail.thread_id);
      for (const r of thread.messages) if (r.id !== detail.id) found.set(r.id, r);
    } catch {
      for (const r of state.rows) if (r.thread_id === detail.thread_id && r.id !== detail.id) found.set(r.id, r);
    }
  }
  return [...found.values()].sort((a, b) => (a.received_at < b.received_at ? -1 : 1));
}

function headerLine(m) {
  const from = parseAddress(m.from);
  return [h("span", { class: "who" }, from.name, from.name !== from.address ? h("span", { class: "muted" }, ` <${from.address}>`) : null),
    h("span", { class: "muted" }, h("time", { datetime: m.date || m.received_at }, longDate(m.date || m.received_at))),
    h("span", { class: "to" }, `To: ${m.to}${m.cc ? ` · Cc: ${m.cc}` : ""}`)];
}

function collapsedView(summary) {
  const article = h("article", { class: "msg collapsed", "aria-label": `Message from ${parseAddress(summary.from).name}` });
  const head = h("div", { class: "msg-head", role: "button", tabindex: "0", "aria-expanded": "false" },
    ...headerLine(summary), h("span", { class: "to muted" }, summary.snippet));
  const expand = async () => {
    const detail = await api.message(summary.id);
    article.replaceWith(await messageView(detail, false));
  };
  head.addEventListener("click", expand);
  head.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); expand(); } });
  article.append(head);
  return article;
}

async function messageView(detail, main) {
  const article = h("article", { class: "msg", "aria-label": `Message from ${parseAddress(detail.from).name}`, "data-id": detail.id });
  article.append(h("div", { class: "msg-head" }, ...headerLine(detail)), await bodyView(detail));
  if (main) article.id = "open-message";
  return article;
}

function updateActions() {
  const m = state.open;
  if (!m) return;
  $("#seen-btn").textContent = m.seen ? "Mark unread" : "Mark read";
  $("#star-btn").textContent = m.flagged ? "★ Starred" : "☆ Star";
  $("#star-btn").setAttribute("aria-pressed", String(m.flagged));
  const junk = folderByRole("junk");
  const inJunk = junk && m.folder_id === junk.id;
  $("#spam-btn").textContent = inJunk ? "Not spam" : "Spam";
  $("#spam-btn").dataset.spam = inJunk ? "0" : "1";
}

async function setFlag(m, flag, value) {
  m[flag] = value;
  const row = state.rows.find((r) => r.id === m.id);
  if (row) { row[flag] = value; updateRow(row); }
  if (state.open && state.open.id === m.id) { state.open[flag] = value; updateActions(); }
  try { await api.patchMessage(m.id, { [flag]: value }); }
  catch (err) { toast(`Could not change it: ${err.message}`); }
}

const actions = {
  reply: () => state.open && openCompose(replyDraft(state.open, false)),
  replyAll: () => state.open && openCompose(replyDraft(state.open, true)),
  forward: () => state.open && openCompose(forwardDraft(state.open)),
  archive: () => moveOpen(folderByRole("archive"), "Archived"),
  delete: async () => {
    const m = current();
    if (!m) return;
    removeRow(m.id);
    try { await api.deleteMessage(m.id); toast("Deleted"); } catch (err) { toast(err.message); }
  },
  toggleSeen: () => { const m = current(); if (m) setFlag(m, "seen", !m.seen); },
  toggleStar: () => { const m = current(); if (m) setFlag(m, "flagged", !m.flagged); },
  spam: async () => {
    const m = current();
    if (!m) return;
    const junk = folderByRole("junk");
    const spam = !(junk && m.folder_id === junk.id);
    removeRow(m.id);
    try { await api.reportSpam(m.id, spam); toast(spam ? "Reported as spam" : "Moved to Inbox: not spam"); }
    catch (err) { toast(err.message); }
  },
};

function current() {
  if (state.open) return state.open;
  return state.selected >= 0 ? state.rows[state.selected] : null;
}

async function moveOpen(folder, done) {
  const m = current();
  if (!m || !folder || m.folder_id === folder.id) return;
  removeRow(m.id);
  try { await api.patchMessage(m.id, { folder: folder.id }); toast(done || `Moved to ${folderName(folder)}`); }
  catch (err) { toast(err.message); }
}

for (const button of document.querySelectorAll("[data-action]")) {
  button.addEventListener("click", () => actions[button.dataset.action]());
}
$("#move-select").addEventListener("change", (event) => {
  const folder = state.folders.find((f) => f.id === event.target.value);
  event.target.value = "";
  if (folder) moveOpen(folder);
});
$("#back-btn").addEventListener("click", () => { $("#app").classList.remove("reading"); $("#list").focus(); });

// ----------------------------------------------------------------------- composing

function me() { return (api.session.get() || {}).address || ""; }

function quote(detail) {
  const from = detail.from || "";
  const lines = (detail.text || "").replace(/\r\n/g, "\n").split("\n").map((l) => `> ${l}`);
  return `\n\nOn ${longDate(detail.date || detail.received_at)}, ${from} wrote:\n${lines.join("\n")}\n`;
}

function prefixed(prefix, subject) {
  return new RegExp(`^${prefix}:`, "i").test(subject || "") ? subject : `${prefix}: ${subject || ""}`;
}

function replyDraft(detail, all) {
  const self = me().toLowerCase();
  const replyTo = (detail.headers || []).find(([k]) => k.toLowerCase() === "reply-to");
  const to = [replyTo ? replyTo[1] : detail.from];
  let cc = [];
  if (all) {
    const mine = (a) => parseAddress(a).address.toLowerCase() === self;
    to.push(...splitAddresses(detail.to).filter((a) => !mine(a)));
    cc = splitAddresses(detail.cc).filter((a) => !mine(a));
  }
  const unique = [...new Map(to.map((a) => [parseAddress(a).address.toLowerCase(), a])).values()];
  return { to: unique.join(", "), cc: cc.join(", "), subject: prefixed("Re", detail.subject),
    text: quote(detail), inReplyTo: detail.id, inReplyToHeader: detail.message_id_header, focus: "body" };
}

function forwardDraft(detail) {
  const text = "\n\n---------- Forwarded message ----------\n" +
    `From: ${detail.from}\nDate: ${longDate(detail.date || detail.received_at)}\n` +
    `Subject: ${detail.subject}\nTo: ${detail.to}\n\n${detail.text || ""}\n`;
  return { to: "", subject: prefixed("Fwd", detail.subject), text, focus: "to" };
}

const compose = { draftId: null, inReplyTo: null, inReplyToHeader: null, attachments: [], timer: null,
  saving: Promise.resolve(), dirty: false, sent: false };

function openCompose(prefill = {}) {
  const form = $("#compose-form");
  form.reset();
  Object.assign(compose, { draftId: prefill.draftId || null, inReplyTo: prefill.inReplyTo || null,
    inReplyToHeader: prefill.inReplyToHeader || null, attachments: [], dirty: false, sent: false });
  $("#c-to").value = prefill.to || "";
  $("#c-cc").value = prefill.cc || "";
  $("#c-bcc").value = prefill.bcc || "";
  $("#c-subject").value = prefill.subject || "";
  $("#c-body").value = prefill.text || "";
  $("#compose-title").textContent = prefill.inReplyTo ? "Reply" : prefill.subject?.startsWith("Fwd") ? "Forward" : "New message";
  $("#draft-state").textContent = compose.draftId ? "Draft" : "";
  $("#compose-error").textContent = "";
  for (const id of ["c-to", "c-cc", "c-bcc"]) checkField(id, true);
  renderAttachments();
  $("#compose").hidden = false;
  const target = prefill.focus === "body" ? $("#c-body") : prefill.to ? $("#c-subject") : $("#c-to");
  target.focus();
  if (prefill.focus === "body") target.setSelectionRange(0, 0);
}

function closeCompose() {
  clearTimeout(compose.timer);
  if (compose.dirty && !compose.sent) saveDraftNow();
  $("#compose").hidden = true;
  $("#list").focus();
}

function checkField(id, quiet) {
  const input = $(`#${id}`);
  const bad = badAddresses(input.value);
  const error = $(`#${id}-err`);
  if (bad.length && !quiet) {
    input.setAttribute("aria-invalid", "true");
    error.textContent = `Not an email address: ${bad.join(", ")}`;
  } else if (!bad.length) {
    input.removeAttribute("aria-invalid");
    error.textContent = "";
  }
  return bad.length === 0;
}
for (const id of ["c-to", "c-cc", "c-bcc"]) $(`#${id}`).addEventListener("blur", () => checkField(id, false));

function draftBody() {
  return {
    to: splitAddresses($("#c-to").value), cc: splitAddresses($("#c-cc").value),
    bcc: splitAddresses($("#c-bcc").value), subject: $("#c-subject").value, text: $("#c-body").value,
    attachments: compose.attachments.map(({ filename, content_type, content_base64 }) => ({ filename, content_type, content_base64 })),
  };
}

function saveDraftNow() {
  const body = { ...draftBody(), in_reply_to: compose.inReplyToHeader || null };
  compose.dirty = false;
  compose.saving = compose.saving.then(async () => {
    if (compose.sent) return;
    $("#draft-state").textContent = "Saving…";
    try {
      const saved = await api.saveDraft(compose.draftId, body);
      compose.draftId = saved.id;
      $("#draft-state").textContent = `Draft saved ${new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`;
    } catch (err) {
      $("#draft-state").textContent = `Draft not saved: ${err.message}`;
    }
  });
  return compose.saving;
}

// Drafts are saved to the Drafts folder as you type (a second after the last key).
$("#compose-form").addEventListener("input", () => {
  compose.dirty = true;
  clearTimeout(compose.timer);
  compose.timer = setTimeout(saveDraftNow, 1000);
});

$("#c-files").addEventListener("change", async (event) => {
  for (const file of event.target.files) {
    const data = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    compose.attachments.push({ filename: file.name, content_type: /^[\w.+-]+\/[\w.+-]+$/.test(file.type) ? file.type : "application/octet-stream",
      content_base64: data, size: file.size });
  }
  event.target.value = "";
  renderAttachments();
  compose.dirty = true;
  clearTimeout(compose.timer);
  compose.timer = setTimeout(saveDraftNow, 300);
});

function renderAttachments() {
  $("#c-attachments").replaceChildren(...compose.attachments.map((a, i) => h("li", { class: "clip" },
    `${a.filename} (${Math.max(1, Math.round(a.size / 1024))} KB)`,
    h("button", { type: "button", "aria-label": `Remove ${a.filename}`, onclick: () => {
      compose.attachments.splice(i, 1); renderAttachments(); compose.dirty = true;
    } }, "✕"))));
}

$("#compose-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const ok = ["c-to", "c-cc", "c-bcc"].map((id) => checkField(id, false)).every(Boolean);
  const body = draftBody();
  if (!ok) { $("#compose-error").textContent = "Fix the addresses first."; return; }
  if (!body.to.length && !body.cc.length && !body.bcc.length) {
    $("#compose-error").textContent = "Add at least one recipient.";
    $("#c-to").focus();
    return;
  }
  clearTimeout(compose.timer);
  compose.sent = true;
  $("#send-btn").disabled = true;
  try {
    await compose.saving;
    const bare = (list) => list.map((a) => parseAddress(a).address);  // the API takes addresses
    await api.send({ ...body, to: bare(body.to), cc: bare(body.cc), bcc: bare(body.bcc),
      in_reply_to: compose.inReplyTo || compose.inReplyToHeader || null });
    if (compose.draftId) { try { await api.discardDraft(compose.draftId); } catch { /* already gone */ } }
    $("#compose").hidden = true;
    toast("Message sent");
    announce("Message sent");
    $("#list").focus();
  } catch (err) {
    compose.sent = false;
    $("#compose-error").textContent = `Not sent: ${err.message}`;
  } finally {
    $("#send-btn").disabled = false;
  }
});

$("#discard-btn").addEventListener("click", async () => {
  clearTimeout(compose.timer);
  compose.sent = true;
  await compose.saving;
  if (compose.draftId) { try { await api.discardDraft(compose.draftId); } catch { /* gone */ } }
  $("#compose").hidden = true;
  toast("Draft discarded");
  $("#list").focus();
});
$("#compose-close").addEventListener("click", closeCompose);
$("#compose-btn").addEventListener("click", () => openCompose());

// -------------------------------------------------------------------------- search

$("#search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = $("#search-input").value.trim();
  if (!q) { if (state.current) openFolder(state.current); return; }
  state.query = q;
  $("#list-title").textContent = `Search: ${q}`;
  $("#clear-search").hidden = false;
  renderFolders();
  await reloadList();
  $("#list").focus();
});
$("#clear-search").addEventListener("click", () => state.current && openFolder(state.current));

// ------------------------------------------------------------------------ keyboard

let pendingG = false;
document.addEventListener("keydown", (event) => {
  const target = event.target;
  const typing = target.closest && target.closest("input, textarea, select, [contenteditable]");
  if (event.key === "Escape") {
    if (!$("#help").hidden) { $("#help").hidden = true; return; }
    if (!$("#compose").hidden) { closeCompose(); return; }
    if (typing) { target.blur(); $("#list").focus(); return; }
    if ($("#app").classList.contains("reading")) { $("#app").classList.remove("reading"); $("#list").focus(); }
    return;
  }
  if (typing || event.ctrlKey || event.metaKey || event.altKey || $("#app").hidden) return;
  if (!$("#compose").hidden && $("#compose").contains(target)) return;
  const key = event.key;
  if (pendingG) {
    pendingG = false;
    const role = { i: "inbox", s: "sent", d: "drafts", a: "archive", t: "trash" }[key];
    if (role && folderByRole(role)) { openFolder(folderByRole(role)); event.preventDefault(); }
    return;
  }
  const run = {
    j: () => select(Math.min(state.selected + 1, state.rows.length - 1), !!state.open),
    k: () => select(Math.max(state.selected - 1, 0), !!state.open),
    o: () => select(state.selected, true),
    Enter: () => { if (target === $("#list") || target === document.body) select(state.selected, true); else return false; },
    r: actions.reply, a: actions.replyAll, f: actions.forward, c: () => openCompose(),
    e: actions.archive, "#": actions.delete, s: actions.toggleStar, u: actions.toggleSeen,
    "!": actions.spam,
    "/": () => $("#search-input").focus(),
    "?": () => { $("#help").hidden = false; $("#help-close").focus(); },
    g: () => { pendingG = true; },
  }[key];
  if (!run) return;
  if (run() === false) return;
  event.preventDefault();
});
$("#help-close").addEventListener("click", () => { $("#help").hidden = true; $("#list").focus(); });

// ----------------------------------------------------------------------- live push

function onPush(frame) {
  switch (frame.type) {
    case "ready":
      if (!state.loaded) initialLoad();
      break;
    case "resync":
      if (state.loaded) { loadFolders(); reloadList(); }
      break;
    case "folder.counts":
      for (const c of frame.folders) {
        const f = state.folders.find((x) => x.id === c.id);
        if (f) { f.unread = c.unread; f.total = c.total; }
      }
      if (frame.folders.length !== state.folders.length) loadFolders(); else renderFolders();
      break;
    case "folder.changed":
      loadFolders();
      break;
    case "message.new": {
      if (!frame.message || state.query || !state.current || frame.folder_id !== state.current.id) break;
      insertRow(frame.message, true);
      const inbox = folderByRole("inbox");
      if (inbox && frame.folder_id === inbox.id) {
        announce(`New message from ${parseAddress(frame.message.from).name}: ${frame.message.subject}`);
      }
      break;
    }
    case "message.flags": {
      const row = state.rows.find((r) => r.id === frame.message_id);
      if (row) { row.seen = frame.seen; row.flagged = frame.flagged; updateRow(row); }
      if (state.open && state.open.id === frame.message_id) {
        state.open.seen = frame.seen; state.open.flagged = frame.flagged; updateActions();
      }
      break;
    }
    case "message.moved":
      if (state.query) break;
      if (state.current && frame.from_folder_id === state.current.id) removeRow(frame.message_id);
      if (state.current && frame.folder_id === state.current.id) {
        api.message(frame.message_id).then((m) => insertRow(m, true)).catch(() => {});
      }
      if (state.open && state.open.id === frame.message_id) { state.open.folder_id = frame.folder_id; updateActions(); }
      break;
    case "message.deleted":
      if (state.current && frame.folder_id === state.current.id) removeRow(frame.message_id);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------- start

if (api.session.get()) startApp(); else showSignIn();
