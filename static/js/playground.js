// The playground streams its sample: the form posts to the stream endpoint and the text is appended as each
// newline-delimited JSON event arrives. Without this script the form posts normally (htmx, or a full page).
(function () {
  "use strict";
  var form = document.getElementById("playground-form");
  if (!form || !window.fetch || !window.TextDecoder) return;
  var modelSelect = form.querySelector("select[name=model]");
  if (modelSelect) {
    modelSelect.addEventListener("change", function () {  // the version list belongs to the chosen model
      window.location.search = "?model=" + encodeURIComponent(modelSelect.value);
    });
  }
  var result = document.getElementById("playground-result");
  var button = form.querySelector("button[type=submit]");

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text) node.textContent = text;
    return node;
  }

  function withheld(event) {
    var box = el("article", {"class": "blocked", role: "alert"});
    box.appendChild(el("h3", {}, "Output withheld"));
    var g = event.guardrail || {};
    var p = el("p");
    p.appendChild(document.createTextNode(event.problem ? "The output guardrail " : "The text matched the output guardrail "));
    var name = event.url ? el("a", {href: event.url}) : el("strong");
    name.textContent = (g.title || "guardrail") + " (guardrail #" + g.id + ")";
    p.appendChild(name);
    p.appendChild(document.createTextNode(event.problem ? " cannot be enforced, so nothing is generated." : ", so it is not shown."));
    box.appendChild(p);
    if (event.problem) box.appendChild(el("p", {"class": "muted", id: "guardrail-problem"}, event.problem));
    if (g.description) box.appendChild(el("p", {"class": "muted"}, g.description));
    return box;
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    e.stopImmediatePropagation();
    var pre = el("pre", {"class": "spec", id: "sample-text", "aria-live": "polite"});
    var note = el("small", {"class": "muted"}, "Generating…");
    var box = el("article");
    box.appendChild(el("h3", {}, "Output"));
    box.appendChild(pre);
    box.appendChild(note);
    result.replaceChildren(box);
    if (button) button.disabled = true;
    var version = "";
    fetch(form.dataset.stream, {method: "POST", body: new FormData(form), credentials: "same-origin",
                                headers: {"X-CSRFToken": form.querySelector("[name=csrfmiddlewaretoken]").value}})
      .then(function (response) {
        if (!response.ok) {
          return response.json().then(function (body) { throw new Error(body.detail || response.statusText); });
        }
        var reader = response.body.getReader();
        var decoder = new TextDecoder();
        var buffer = "";
        function handle(line) {
          if (!line) return;
          var event = JSON.parse(line);
          if (event.event === "start") {
            version = "v" + event.version + " of " + event.model + " (checkpoint " + event.checkpoint.slice(0, 12) + ")";
            note.textContent = "Generating from " + version + "…";
          } else if (event.event === "text") {
            pre.textContent += event.text;
          } else if (event.event === "replace") {
            pre.textContent = event.text;
          } else if (event.event === "withheld") {
            result.replaceChildren(withheld(event));
          } else if (event.event === "done") {
            note.textContent = event.tokens + " tokens from " + version + ".";
          }
        }
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) { handle(buffer.trim()); return; }
            buffer += decoder.decode(chunk.value, {stream: true});
            var lines = buffer.split("\n");
            buffer = lines.pop();
            lines.forEach(handle);
            return pump();
          });
        }
        return pump();
      })
      .catch(function (err) { result.replaceChildren(el("p", {"class": "errorlist", role: "alert"}, String(err.message || err))); })
      .finally(function () { if (button) button.disabled = false; });
  }, true);
})();
