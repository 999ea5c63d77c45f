// The arena page's messages: a user turn, a model reply with its badges, Copy and Regenerate, and one
// reply streamed into its message over server-sent events. Model text is only ever set with textContent.
"use strict";

const $ = (selector) => document.querySelector(selector);

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

// A blind reply before the vote carries its words and on-topic flag only (both about the text itself):
// its stop token or length could name its model.
function badges(box, reply) {
  box.textContent = "";
  const tags = [`${reply.words} word${reply.words === 1 ? "" : "s"}`];
  if (reply.on_topic === true) tags.push("on topic");
  else if (reply.on_topic === false) tags.push("off topic");
  if (!reply.hidden) {
    if (reply.finish_reason === "stopped") tags.push("stopped by you");
    else if (reply.cut) tags.push(`cut at ${reply.tokens} tokens`);
    else tags.push("stopped by itself");
    if (reply.loop) tags.push("loop");
    if (reply.stop_token && !["<end_of_turn>", "<eos>"].includes(reply.stop_token)) tags.push(`stopped by ${reply.stop_token}`);
    if (reply.best_of) tags.push(`best of ${reply.best_of.n}`);
  }
  for (const tag of tags) {
    const span = document.createElement("span");
    span.className = "badge" + (tag.startsWith("cut") ? " cut" : tag === "loop" ? " loop" : tag === "off topic" ? " off" : "");
    span.textContent = tag;
    box.appendChild(span);
  }
}

function userMessage(messages, text) {
  const item = document.createElement("div");
  item.className = "message user";
  item.textContent = text;
  messages.appendChild(item);
}

// A model message: the reply, its badges, and Copy and Regenerate (the last reply of a column only).
function modelMessage(messages, mode, side) {
  const item = document.createElement("div");
  item.className = "message model";
  const pre = document.createElement("pre");
  pre.className = "reply";
  const box = document.createElement("div");
  box.className = "badges";
  const tools = document.createElement("div");
  tools.className = "tools";
  const copy = document.createElement("button");
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(pre, copy));
  const again = document.createElement("button");
  again.className = "regenerate";
  again.textContent = "Regenerate";
  again.addEventListener("click", () => regenerate(mode, side, item));
  tools.append(copy, again);
  item.append(pre, box, tools);
  for (const old of messages.querySelectorAll(".regenerate")) old.remove();
  messages.appendChild(item);
  return item;
}

async function copyText(pre, button) {
  try {
    await navigator.clipboard.writeText(pre.textContent);
    button.textContent = "Copied";
  } catch (_) { // no clipboard (an http page on another machine): select the text for Ctrl-C
    getSelection().selectAllChildren(pre);
    button.textContent = "Selected: press Ctrl-C";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// One reply streamed over server-sent events into a model message; resolves with the reply (null: failed).
// `waiting` is shown until the reply ends ("sampling 4 replies..." when the arena keeps the best of 4).
function streamInto(url, item, waiting = "writing...") {
  const pre = item.querySelector("pre.reply");
  const box = item.querySelector(".badges");
  pre.textContent = "";
  box.textContent = waiting;
  return new Promise((resolve) => {
    const source = new EventSource(url);
    source.addEventListener("text", (event) => { pre.textContent += JSON.parse(event.data).text; });
    source.addEventListener("done", (event) => {
      const reply = JSON.parse(event.data);
      pre.textContent = reply.text;
      badges(box, reply);
      source.close();
      resolve(reply);
    });
    source.addEventListener("error", (event) => {
      source.close();
      let message = "the reply stopped (the server could not be reached)";
      if (event.data) message = JSON.parse(event.data).message;
      box.textContent = "";
      showError(message);
      resolve(null);
    });
  });
}
