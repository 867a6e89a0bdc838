// Small DOM helpers. Mail data only ever reaches the page as text nodes (never innerHTML).
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export const $ = (selector) => document.querySelector(selector);

export function announce(text) {
  const region = $("#announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 30);
}

let toastTimer = null;
export function toast(text) {
  const el = $("#toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 3500);
}

// "Carol Smith <carol@example.org>" -> {name, address}
export function parseAddress(value) {
  const text = (value || "").trim();
  const angle = text.match(/^(.*)<([^<>]+)>\s*$/);
  if (angle) {
    const name = angle[1].trim().replace(/^"(.*)"$/, "$1");
    return { name: name || angle[2].trim(), address: angle[2].trim() };
  }
  return { name: text, address: text };
}

// Top-level commas only (a quoted display name may contain one).
export function splitAddresses(value) {
  const out = [];
  let current = "", quoted = false, angle = false;
  for (const ch of value || "") {
    if (ch === '"') quoted = !quoted;
    if (ch === "<") angle = true;
    if (ch === ">") angle = false;
    if ((ch === "," || ch === ";") && !quoted && !angle) { out.push(current); current = ""; }
    else current += ch;
  }
  out.push(current);
  return out.map((s) => s.trim()).filter(Boolean);
}

const ADDRESS = /^[^\s@<>(),;:"]+@[A-Za-z0-9\u00a0-\uffff](?:[A-Za-z0-9\u00a0-\uffff-]*[A-Za-z0-9\u00a0-\uffff])?(?:\.[A-Za-z0-9\u00a0-\uffff](?:[A-Za-z0-9\u00a0-\uffff-]*[A-Za-z0-9\u00a0-\uffff])?)+$/;
export function badAddresses(value) {
  return splitAddresses(value).filter((item) => !ADDRESS.test(parseAddress(item).address));
}

export function shortDate(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  if (date.getFullYear() === now.getFullYear()) {
    return date.toLocaleDateString([], { month: "short", day: "numeric" });
  }
  return date.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" });
}

export const longDate = (iso) => iso ? new Date(iso).toLocaleString([], {
  weekday: "short", year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
}) : "";
