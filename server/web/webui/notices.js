// Banner, toast and the narrow screen's drawer.
import {$} from "./store.js";

// -- banner, toast, drawer ------------------------------------------------------------------------------------
let bannerSource = null;
export function showNotices(lines) {
  // Server-side advice the person should act on (e.g. a GPU that torch cannot use); already bilingual.
  $("notice").textContent = lines.join("\n");
  $("notice").hidden = lines.length === 0;
}
export function showBanner(text, kind = "warn", source = "action") {
  if (!text) return;
  bannerSource = source;
  $("banner-text").textContent = text;
  $("banner").className = kind;
  $("banner").hidden = false;
}
export function hideBanner(source) {
  if (source && bannerSource !== source) return;
  $("banner").hidden = true;
}
let toastTimer = null;
export function showToast(text, action, onAction) {
  $("toast-text").textContent = text;
  const button = $("toast-action");
  button.hidden = !action;
  button.textContent = action || "";
  button.onclick = () => { $("toast").hidden = true; onAction(); };
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { $("toast").hidden = true; }, 6000);
}
export const narrow = window.matchMedia("(max-width: 760px)");
export function setDrawer(open) {
  $("sidebar").classList.toggle("open", open);
  $("scrim").hidden = !open;
  // a closed drawer is off-screen: out of the Tab order and of screen readers too
  $("sidebar").inert = narrow.matches && !open;
}
export const openDrawer = () => setDrawer(true);
export const closeDrawer = () => setDrawer(false);
