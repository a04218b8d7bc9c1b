// The mmstack web page: search a collection, chat about an image (streamed), generate images.
// Plain DOM, no build step and no third-party code; every text from the server goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = { messages: [], imageSent: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(message) {
  $("status").textContent = message || "";
}

async function errorOf(response) {
  try {
    return (await response.json()).error.message;
  } catch (e) {
    return "HTTP " + response.status;
  }
}

async function api(path, body) {
  const init = body ? { method: "POST", headers: headers(), body: JSON.stringify(body) } : { headers: headers() };
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

function readFile(input) {
  const file = input.files && input.files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function fillSelect(select, names) {
  select.replaceChildren(...names.map((n) => Object.assign(element("option", "", n), { value: n })));
  select.disabled = names.length === 0;
}

async function loadLists() {
  try {
    const models = (await api("/v1/models")).data;
    const able = (cap) => models.filter((m) => (m.capabilities || []).includes(cap)).map((m) => m.id);
    fillSelect($("chat-model"), able("chat"));
    fillSelect($("gen-model"), able("images"));
    fillSelect($("search-collection"), (await api("/v1/collections")).data.map((c) => c.id));
    setStatus("");
  } catch (err) {
    setStatus("cannot list models: " + err.message + " (is an API key needed?)");
  }
}

// ---------------------------------------------------------------------------------------- tabs

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === "panel-" + tab.dataset.panel));
  });
}

function showPreview(input, img) {
  input.addEventListener("change", async () => {
    const url = await readFile(input);
    img.hidden = !url;
    if (url) img.src = url;
  });
}

// -------------------------------------------------------------------------------------- search

function renderHits(hits) {
  const grid = $("search-results");
  if (!hits.length) {
    grid.replaceChildren(element("p", "empty", "no hits"));
    return;
  }
  grid.replaceChildren(
    ...hits.map((hit) => {
      const card = element("figure", "hit");
      if (hit.image) card.append(Object.assign(document.createElement("img"), { src: hit.image, alt: hit.caption || hit.id }));
      card.append(element("div", "score", "score " + Number(hit.score).toFixed(3)));
      card.append(element("div", "caption", hit.caption || hit.path || hit.id));
      return card;
    })
  );
}

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("search-button");
  button.disabled = true;
  try {
    const body = {
      collection: $("search-collection").value,
      query: $("search-query").value.trim() || null,
      image: await readFile($("search-image")),
      top_k: Number($("search-top-k").value) || 12,
      include_images: true,
    };
    if (!body.query && !body.image) throw new Error("type a query or choose an image");
    renderHits((await api("/v1/search", body)).hits);
    setStatus("");
  } catch (err) {
    setStatus("search failed: " + err.message);
  } finally {
    button.disabled = false;
  }
});

$("search-clear-image").addEventListener("click", () => {
  $("search-image").value = "";
  $("search-preview").hidden = true;
});

// ---------------------------------------------------------------------------------------- chat

function addMessage(role, text, imageUrl) {
  const bubble = element("div", "msg " + role);
  if (imageUrl) bubble.append(Object.assign(document.createElement("img"), { src: imageUrl, alt: "uploaded image" }));
  const span = element("span", "text", text);
  bubble.append(span);
  $("chat-log").append(bubble);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return span;
}

// Reads an OpenAI server-sent event stream, calling onDelta with each piece of content.
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onDelta(delta.content);
      }
    }
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  const button = $("chat-send");
  button.disabled = true;
  try {
    const image = await readFile($("chat-image"));
    const content = [{ type: "text", text }];
    if (image) content.push({ type: "image_url", image_url: { url: image } });
    const pending = [...chat.messages, { role: "user", content }];
    addMessage("user", text, image);
    $("chat-input").value = "";
    const answer = addMessage("assistant", "");
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: $("chat-model").value, messages: pending, stream: true }),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    await readStream(response, (delta) => {
      answer.textContent += delta;
    });
    chat.messages = [...pending, { role: "assistant", content: answer.textContent.trim() }];
    if (image) {
      // The model takes one image per conversation.
      chat.imageSent = true;
      $("chat-image").value = "";
      $("chat-image").disabled = true;
      $("chat-preview").hidden = true;
    }
    setStatus("");
  } catch (err) {
    setStatus("chat failed: " + err.message);
  } finally {
    button.disabled = false;
  }
});

$("chat-clear").addEventListener("click", () => {
  chat.messages = [];
  chat.imageSent = false;
  $("chat-log").replaceChildren();
  $("chat-image").disabled = false;
});

// ------------------------------------------------------------------------------------ generate

$("gen-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("gen-button");
  button.disabled = true;
  try {
    const prompt = $("gen-prompt").value.trim();
    if (!prompt) throw new Error("type a prompt");
    const body = { model: $("gen-model").value, prompt, n: Number($("gen-n").value) || 1, response_format: "b64_json" };
    const images = (await api("/v1/images/generations", body)).data;
    $("gen-results").replaceChildren(
      ...images.map((img) => {
        const card = element("figure", "hit");
        card.append(Object.assign(document.createElement("img"), { src: "data:image/png;base64," + img.b64_json, alt: prompt }));
        card.append(element("div", "caption", prompt));
        return card;
      })
    );
    setStatus("");
  } catch (err) {
    setStatus("generation failed: " + err.message);
  } finally {
    button.disabled = false;
  }
});

// ------------------------------------------------------------------------------------- startup

$("api-key").value = localStorage.getItem("mmstack-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("mmstack-api-key", $("api-key").value.trim());
  loadLists();
});
showPreview($("search-image"), $("search-preview"));
showPreview($("chat-image"), $("chat-preview"));
loadLists();
