// The reading pane's mail body. HTML mail, already sanitised by the server, goes into an iframe
// with `sandbox` (no scripts, no forms, no same-origin, no top navigation) whose document also
// carries its own Content-Security-Policy: nothing may be fetched except images we inline as
// data: URLs ourselves (cid: parts). Remote images come marked `remote-image:N` and stay
// hidden until the reader asks; then each is fetched through the server's image proxy (the
// sender never sees the reader) and inlined as a data: URL too. Links open in a new tab
// without a referrer.
import { attachmentBlob } from "./api.js";
import { h } from "./dom.js";

const FRAME_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; " +
  "font-src data:; form-action 'none'; base-uri 'none'";
// The frame's own style: the page's CSP allows exactly this text (its sha256) inline.
let frameStyle = null;
async function styleText() {
  if (frameStyle === null) {
    try { frameStyle = await (await fetch("/webmail/frame.css", { credentials: "omit" })).text(); }
    catch { frameStyle = ""; }
  }
  return frameStyle;
}

const toDataUrl = (blob) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result);
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(blob);
});

async function inlineParts(html, detail, showRemote) {
  // An inert document (DOMParser runs no scripts and loads nothing) to rewrite cid: images.
  const doc = new DOMParser().parseFromString(html, "text/html");
  for (const img of doc.querySelectorAll("img[src^='cid:' i]")) {
    const cid = decodeURIComponent(img.getAttribute("src").slice(4)).replace(/^<|>$/g, "");
    const part = detail.attachments.find((a) => a.content_id.replace(/^<|>$/g, "") === cid);
    if (!part) { img.removeAttribute("src"); continue; }
    try { img.setAttribute("src", await toDataUrl(await attachmentBlob(part.url))); }
    catch { img.removeAttribute("src"); }
  }
  for (const img of doc.querySelectorAll("img[src^='remote-image:']")) {
    const url = (detail.remote_images || [])[Number(img.getAttribute("src").slice(13))];
    img.removeAttribute("src");
    if (!showRemote || !url) continue;
    try {
      const proxied = `/v1/messages/${encodeURIComponent(detail.id)}/image?url=${encodeURIComponent(url)}`;
      img.setAttribute("src", await toDataUrl(await attachmentBlob(proxied)));
    } catch { /* unreachable or not an image: stays blank */ }
  }
  for (const a of doc.querySelectorAll("a[href]")) {
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer nofollow");
  }
  return doc.body.innerHTML;
}

export async function bodyView(detail, showRemote = false) {
  const box = h("div", { class: "msg-body" });
  if (detail.remote_images_blocked > 0 && !showRemote) {
    const show = h("button", { type: "button", class: "link-btn show-images" }, "Show images");
    show.addEventListener("click", async () => {
      show.disabled = true;
      box.replaceWith(await bodyView(detail, true));
    });
    box.append(h("p", { class: "notice", role: "note" },
      `${detail.remote_images_blocked} remote image${detail.remote_images_blocked > 1 ? "s" : ""} ` +
      "blocked to protect your privacy. ", show));
  }
  if (detail.html) {
    const frame = h("iframe", {
      title: `Message: ${detail.subject || "(no subject)"}`,
      sandbox: "allow-popups allow-popups-to-escape-sandbox",
      referrerpolicy: "no-referrer",
      loading: "lazy",
      class: "mail-frame",
    });
    const inner = await inlineParts(detail.html, detail, showRemote);
    frame.srcdoc = "<!doctype html><html><head><meta charset=\"utf-8\">" +
      `<meta http-equiv="Content-Security-Policy" content="${FRAME_CSP}">` +
      `<meta name="referrer" content="no-referrer"><base target="_blank"><style>${await styleText()}</style>` +
      `</head><body>${inner}</body></html>`;
    frame.style.height = "65vh";
    box.append(frame);
  } else {
    box.append(h("pre", { class: "text" }, detail.text || ""));
  }
  if (detail.attachments && detail.attachments.length) {
    const list = h("ul", { class: "attachments", "aria-label": "Attachments" });
    for (const part of detail.attachments) {
      if (part.disposition === "inline" && part.content_id) continue;
      const button = h("button", { type: "button", class: "link-btn clip" },
        `${part.filename || "attachment"} (${Math.max(1, Math.round(part.size / 1024))} KB)`);
      button.addEventListener("click", async () => {
        const blob = await attachmentBlob(part.url);
        const url = URL.createObjectURL(blob);
        const link = h("a", { href: url, download: part.filename || "attachment" });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      });
      list.append(h("li", {}, button));
    }
    if (list.children.length) box.append(list);
  }
  return box;
}
