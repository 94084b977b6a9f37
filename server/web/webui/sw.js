// The page's service worker: keeps the app shell, so that opening the installed page while the server is not
// running shows the page itself, which then says how to start the server, instead of the browser's error page.
// The API is never cached.
"use strict";
const SHELL = "chatglm2-shell-v2";
// every file of the page, its modules too (tests/test_web_ui.py checks that none is missing)
const FILES = ["/ui/", "/ui/app.js", "/ui/strings.js", "/ui/store.js", "/ui/api.js", "/ui/generation.js",
               "/ui/actions.js", "/ui/render.js", "/ui/meter.js", "/ui/notices.js", "/ui/app.css", "/ui/pygments.css",
               "/ui/manifest.webmanifest", "/ui/icon-192.png"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()));
});
self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((names) => Promise.all(names.filter((n) => n !== SHELL).map((n) => caches.delete(n))))
    .then(() => self.clients.claim()));
});
self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || !FILES.includes(url.pathname)) return; // the API goes to the network
  // the network first (the page is always the current one), the shell when the server does not answer
  event.respondWith(fetch(event.request)
    .then((response) => {
      const copy = response.clone();
      caches.open(SHELL).then((cache) => cache.put(event.request, copy));
      return response;
    })
    .catch(() => caches.match(event.request, {ignoreVary: true})));  // (module scripts ask with an Origin header)
});
