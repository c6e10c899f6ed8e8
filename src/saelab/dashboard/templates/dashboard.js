// saelab dashboard: routes by the URL's hash and builds a latent's view from latents/<id>.js on demand.
//   #latent=12   show latent 12            #search=12   what the search box does with "12"
//   ?q=12        the same, from a query    (nothing)    the overview
// Latent files are scripts calling window.SAELAB_LATENT(data): <script src> works from file://, fetch() does not.
(function () {
  "use strict";
  var S = window.SAELAB_SUMMARY;
  var D_SAE = S.sae.d_sae;
  var built = {};
  S.latents.forEach(function (l, i) { built[l.id] = i; });
  var loaded = {};
  var pending = null;
  var SVG = "http://www.w3.org/2000/svg";

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function pct(d) {
    if (d === 0) return "0";
    return d >= 1e-4 ? (100 * d).toPrecision(3) + "%" : d.toExponential(2);
  }

  function num(v) { return Number(v).toPrecision(4).replace(/\.?0+$/, "").replace(/\.?0+e/, "e"); }

  function show(view) {
    $("overview").hidden = view !== "summary";
    $("latent").hidden = view.indexOf("latent:") !== 0;
    if (view !== "message") $("message").hidden = true;
    document.body.setAttribute("data-view", view);
  }

  function message(text) {
    var m = $("message");
    m.textContent = text;
    m.hidden = false;
    $("overview").hidden = false;
    $("latent").hidden = true;
    document.body.setAttribute("data-view", "message");
  }

  // The search box's handler; #search=<q> and ?q=<q> go through it too.
  function search(query) {
    var q = String(query === null || query === undefined ? "" : query).trim().replace(/^#/, "");
    if (!/^\d+$/.test(q)) {
      message("\u201c" + q + "\u201d is not a latent id: type a whole number from 0 to " + (D_SAE - 1) + ".");
      return false;
    }
    var target = "#latent=" + Number(q);
    if (location.hash === target) route();
    else location.hash = target;
    return true;
  }

  function route() {
    var hash = new URLSearchParams(location.hash.replace(/^#/, ""));
    var query = new URLSearchParams(location.search);
    if (hash.has("search")) return search(hash.get("search"));
    if (hash.has("latent")) return showLatent(hash.get("latent"));
    if (!location.hash && query.has("q")) return search(query.get("q"));
    show("summary");
  }

  function showLatent(raw) {
    if (!/^\d+$/.test(raw)) return message("\u201c" + raw + "\u201d is not a latent id.");
    var id = Number(raw);
    if (id >= D_SAE) {
      return message("There is no latent " + id + ": this SAE has " + D_SAE + " latents (0\u2013" + (D_SAE - 1) + ").");
    }
    if (!(id in built)) {
      return message("Latent " + id + " is not in this dashboard: it holds " + S.latents.length + " of the " + D_SAE +
        " latents. Rebuild with saelab-dashboard <dir> latents=[" + id + "] (or add it: latents=top:50+" + id + ").");
    }
    if (loaded[id]) return renderLatent(loaded[id]);
    pending = id;
    document.body.setAttribute("data-view", "loading");
    var script = document.createElement("script");
    script.src = "latents/" + String(id).padStart(S.pad, "0") + ".js";
    script.onerror = function () { message("The data file for latent " + id + " is missing: " + script.src); };
    document.head.appendChild(script);
  }

  window.SAELAB_LATENT = function (data) {
    loaded[data.id] = data;
    if (pending === data.id) renderLatent(data);
  };

  function histogram(hist) {
    var W = 360, H = 130, L = 34, B = 22, T = 8, pw = W - L - 8, ph = H - B - T;
    var box = svg("svg", { "class": "hist", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    var counts = hist.counts, n = counts.length;
    var top = Math.max.apply(null, counts.concat([1]));
    box.appendChild(svg("line", { "class": "axis", x1: L, y1: T + ph, x2: L + pw, y2: T + ph }));
    box.appendChild(svg("line", { "class": "axis", x1: L, y1: T, x2: L, y2: T + ph }));
    counts.forEach(function (c, i) {
      // log scale: activation histograms are heavy-tailed; a count of 1 still shows
      var h = c > 0 ? ph * Math.log10(1 + c) / Math.log10(1 + top) : 0;
      var bar = svg("rect", { "class": "bar", x: (L + i * pw / n + 0.5).toFixed(1), y: (T + ph - h).toFixed(1),
        width: Math.max(pw / n - 1, 1).toFixed(1), height: h.toFixed(1) });
      var tip = svg("title", {});
      tip.textContent = num(hist.edges[i]) + " to " + num(hist.edges[i + 1]) + ": " + c + " tokens";
      bar.appendChild(tip);
      box.appendChild(bar);
    });
    [[L - 3, T + 4, "end", String(top)], [L - 3, T + ph, "end", "0"], [L, H - 8, "start", "0"],
     [L + pw, H - 8, "end", num(hist.edges[n])]].forEach(function (t) {
      var label = svg("text", { "class": "tick", x: t[0], y: t[1], "text-anchor": t[2] });
      label.textContent = t[3];
      box.appendChild(label);
    });
    return box;
  }

  function tokenList(title, items, cls) {
    var list = el("ol", { className: "logits " + cls });
    items.forEach(function (t) {
      list.appendChild(el("li", {}, [el("code", { text: JSON.stringify(t.token).slice(1, -1) }),
        el("span", { className: "value", text: (t.value > 0 ? "+" : "") + num(t.value) })]));
    });
    return el("div", { className: "logit-col" }, [el("h4", { text: title }), list]);
  }

  function context(c, peak) {
    var line = el("div", { className: "context", "data-window": c.window });
    line.appendChild(el("span", { className: "ctx-max", text: num(c.max) }));
    var text = el("span", { className: "ctx-text" });
    if (c.cut_left) text.appendChild(el("span", { className: "cut", text: "\u2026" }));
    c.tokens.forEach(function (tok, i) {
      var a = c.acts[i];
      var shown = tok.replace(/\n/g, "\u21b5");
      var lead = shown.match(/^ */)[0];  // a token's leading space stays outside its highlight
      if (lead && lead.length < shown.length) text.appendChild(document.createTextNode(lead));
      else lead = "";
      var span = el("span", { className: "tok" + (c.special[i] ? " special" : "") + (i === c.center ? " peak" : ""),
        text: shown.slice(lead.length), title: c.special[i] ? "special token (not encoded)" : "activation " + num(a) });
      if (a > 0) span.style.backgroundColor = "rgba(255, 112, 0, " + Math.min(1, 0.12 + 0.88 * a / peak).toFixed(3) + ")";
      text.appendChild(span);
    });
    if (c.cut_right) text.appendChild(el("span", { className: "cut", text: "\u2026" }));
    line.appendChild(text);
    return line;
  }

  function renderLatent(d) {
    var box = $("latent");
    box.textContent = "";
    var i = built[d.id];
    var prev = S.latents[i - 1], next = S.latents[i + 1];
    var nav = el("nav", { className: "pager" }, [
      el("a", { href: "#", text: "\u2190 overview" }),
      prev ? el("a", { href: "#latent=" + prev.id, text: "\u2039 latent " + prev.id }) : null,
      next ? el("a", { href: "#latent=" + next.id, text: "latent " + next.id + " \u203a" }) : null]);
    box.appendChild(nav);
    box.appendChild(el("h2", { text: "Latent " + d.id }, [el("span", { className: "chosen", text: " " + d.chosen_by })]));
    var stats = el("table", { className: "kv stats" });
    [["firing density", pct(d.density) + " (" + d.fires + " of " + S.held_out.tokens + " held-out tokens)"],
     ["max activation", num(d.max)], ["mean when firing", num(d.mean)]].concat(d.site_norms ?
      Object.keys(d.site_norms).map(function (site) { return ["decoder norm at " + site, num(d.site_norms[site])]; })
      : []).forEach(function (r) {
      stats.appendChild(el("tr", {}, [el("th", { text: r[0] }), el("td", { text: r[1] })]));
    });
    var row = el("div", { className: "row" }, [stats]);
    if (d.histogram.counts.length) {
      row.appendChild(el("figure", {}, [histogram(d.histogram),
        el("figcaption", { text: "nonzero activations (count, log scale)" })]));
    }
    box.appendChild(row);

    box.appendChild(el("h3", { text: "Top activating held-out contexts" }));
    if (!d.contexts.length) {
      box.appendChild(el("p", { className: "note", text: "This latent never fired on the held-out tokens." }));
    }
    var contexts = el("div", { className: "contexts" });
    d.contexts.forEach(function (c) { contexts.appendChild(context(c, d.max)); });
    box.appendChild(contexts);

    box.appendChild(el("h3", { text: "Logit effects of its decoder row" }));
    if (d.logits) {
      box.appendChild(el("p", { className: "note", text: "W_dec[" + d.id + "] \u00b7 W_U: the direct path to the " +
        "logits, skipping later blocks and the final norm." }));
      box.appendChild(el("div", { className: "row" }, [tokenList("raises", d.logits.up, "up"),
        tokenList("lowers", d.logits.down, "down")]));
    } else {
      box.appendChild(el("p", { className: "note", id: "logit-note", text: S.logit_note || "Not computed." }));
    }
    show("latent:" + d.id);
    window.scrollTo(0, 0);
  }

  $("search-form").addEventListener("submit", function (event) {
    event.preventDefault();
    search($("search-input").value);
  });
  window.addEventListener("hashchange", route);
  window.SAELAB_SEARCH = search;
  route();
})();
