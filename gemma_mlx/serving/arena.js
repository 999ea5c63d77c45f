// The arena page: plain DOM, no build step. Model text is only ever set with textContent.
// Two conversations live here at once: the side-by-side chat and the blind battle. The server keeps
// each side's history; the page sends the new message and reads each side's reply as it streams
// (messages.js draws the messages and streams a reply into one).
"use strict";

const SETTINGS = ["temperature", "top_p", "max_tokens", "repetition_penalty", "seed"];
const chats = {side: null, blind: null}; // {id, sides, voted} of each view's conversation
let info = {models: [], blind: false};

function settingsQuery() {
  const params = new URLSearchParams();
  for (const key of SETTINGS) {
    const value = $("#" + key).value;
    if (value !== "") params.set(key, value);
  }
  return params;
}

function settingsObject() {
  return Object.fromEntries(settingsQuery().entries());
}

async function checked(response) {
  if (response.ok) return response.json();
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
  throw new Error(message);
}

const post = async (url, body) => checked(await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                                             body: JSON.stringify(body || {})}));

function columnOf(mode, side) {
  if (mode === "blind") return $(`#col-${side}`);
  return [...document.querySelectorAll("#side-columns .column")].find((column) => column.dataset.side === side);
}

function sideColumns(models) {
  const columns = $("#side-columns");
  columns.textContent = "";
  for (const model of models) {
    const column = document.createElement("div");
    column.className = "column";
    column.dataset.side = model;
    const title = document.createElement("h2");
    title.textContent = model;
    const messages = document.createElement("div");
    messages.className = "messages";
    column.append(title, messages);
    columns.appendChild(column);
  }
}

// ---------------------------------------------------------------------------- sending, stopping, saving

const activeMode = () => ($("#blind").hidden ? "side" : "blind");

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
}

async function send() {
  showError("");
  const mode = activeMode();
  const text = $("#prompt").value.trim();
  if (!text) { showError("The message is empty. Type something, or pick a prompt from a prompt set."); return; }
  if ($("#send").disabled) return; // a reply is still being written
  let chat = chats[mode];
  const body = {prompt: text, ...settingsObject()};
  try {
    if (!chat) {
      body.system = $("#system").value;
      if (mode === "side") {
        body.models = [...document.querySelectorAll("#model-picks input:checked")].map((box) => box.value);
        if (!body.models.length) throw new Error("Tick at least one model.");
      }
      const started = await post(mode === "blind" ? "/api/battle" : "/api/chat", body);
      chat = chats[mode] = {id: started.id, sides: started.sides, voted: false};
      if (mode === "side") sideColumns(started.sides);
    } else {
      await post(`/api/chat/${chat.id}/turn`, body);
    }
  } catch (error) { showError(error.message); return; }
  $("#prompt").value = "";
  const items = chat.sides.map((side) => {
    const messages = columnOf(mode, side).querySelector(".messages");
    userMessage(messages, text);
    return modelMessage(messages, mode, side);
  });
  await follow(mode, chat, chat.sides, items);
}

// Read the replies of `sides` into `items`, then save the conversation (and, in a battle, open the vote).
async function follow(mode, chat, sides, items) {
  setBusy(true);
  if (mode === "blind") setVoting(false);
  const waiting = info.best_of > 1 ? `sampling ${info.best_of} replies...` : "writing...";
  const replies = await Promise.all(sides.map((side, i) =>
    streamInto(`/api/chat/${chat.id}/stream?side=${encodeURIComponent(side)}`, items[i], waiting)));
  setBusy(false);
  if (chats[mode] !== chat) return; // a new chat or battle began meanwhile
  if (mode === "blind" && !chat.voted && replies.every((reply) => reply)) setVoting(true);
  await save(chat);
}

async function save(chat) {
  try {
    const saved = await post(`/api/chat/${chat.id}/save`);
    $("#saved-note").textContent = `Saved to ${saved.saved}`;
  } catch (error) { showError(error.message); }
}

async function stop() {
  const chat = chats[activeMode()];
  if (!chat) return;
  try { await post(`/api/chat/${chat.id}/stop`); } catch (error) { showError(error.message); }
}

async function regenerate(mode, side, item) {
  const chat = chats[mode];
  if (!chat || $("#send").disabled) return;
  showError("");
  try { await post(`/api/chat/${chat.id}/regenerate`, {side, ...settingsObject()}); } catch (error) {
    showError(error.message);
    return;
  }
  await follow(mode, chat, [side], [item]);
}

// ---------------------------------------------------------------------------- the blind battle

function setVoting(enabled) {
  for (const button of document.querySelectorAll("#votes button[data-choice]")) button.disabled = !enabled;
}

function nextBattle() {
  if (chats.blind && $("#send").disabled) stop(); // the replies still being written end on the server too
  chats.blind = null;
  for (const side of ["A", "B"]) {
    $(`#col-${side} .messages`).textContent = "";
    $(`#col-${side} .name`).textContent = "";
  }
  $("#verdict").textContent = "";
  setVoting(false);
  $("#prompt").focus();
}

async function vote(choice) {
  const chat = chats.blind;
  if (!chat || chat.voted) return;
  setVoting(false);
  try {
    const result = await post("/api/vote", {id: chat.id, choice});
    chat.voted = true;
    showError(""); // a vote that failed before (a full disk) went through on this try
    const words = {A: "A is better", B: "B is better", tie: "a tie", bad: "both bad"};
    $("#verdict").textContent = `Your vote: ${words[choice]}. A was ${result.model_a}, B was ${result.model_b}. ` +
      "Press N for the next battle.";
    showConversation(await checked(await fetch(`/api/chat/${chat.id}`))); // now with names and badges
    await save(chat);
    await loadBoard();
  } catch (error) { showError(error.message); setVoting(true); }
}

// ---------------------------------------------------------------------------- the leaderboard

function cell(row, text, numeric) {
  const td = document.createElement("td");
  td.textContent = text;
  if (numeric) td.className = "n";
  row.appendChild(td);
}

const percent = (value) => (value === null || value === undefined ? "-" : `${Math.round(100 * value)}%`);

async function loadBoard() {
  let board;
  try { board = await checked(await fetch("/api/leaderboard")); } catch (error) { showError(error.message); return; }
  const body = $("#ratings tbody");
  body.textContent = "";
  for (const m of board.models) {
    const row = document.createElement("tr");
    cell(row, m.model);
    cell(row, m.rating.toFixed(0), true);
    cell(row, m.low === null ? `- (under ${board.min_votes} votes)` : `${m.low.toFixed(0)} - ${m.high.toFixed(0)}`, true);
    cell(row, String(m.votes), true);
    cell(row, percent(m.stop_rate), true);
    cell(row, percent(m.cut_rate), true);
    cell(row, percent(m.loop_rate), true);
    body.appendChild(row);
  }
  const pairs = $("#pairs tbody");
  pairs.textContent = "";
  for (const p of board.pairs) {
    const row = document.createElement("tr");
    cell(row, `${p.a} vs ${p.b}`);
    cell(row, String(p.votes), true);
    cell(row, `${p.a_wins} - ${p.b_wins}`, true);
    cell(row, String(p.ties), true);
    pairs.appendChild(row);
  }
}

// ---------------------------------------------------------------------------- saved conversations

// Draw a conversation the server sent (GET /api/chat/ID or a reopened one) into its view.
function showConversation(view) {
  const mode = view.blind ? "blind" : "side";
  const sides = Object.keys(view.sides);
  const previous = chats[mode];
  chats[mode] = {id: view.id, sides, voted: view.choice !== null};
  if (previous && previous.id === view.id) chats[mode] = Object.assign(previous, chats[mode]);
  if (mode === "side") sideColumns(sides);
  for (const side of sides) {
    const column = columnOf(mode, side);
    const messages = column.querySelector(".messages");
    messages.textContent = "";
    for (const message of view.sides[side].messages) {
      if (message.role === "user") { userMessage(messages, message.content); continue; }
      const item = modelMessage(messages, mode, side);
      item.querySelector("pre.reply").textContent = message.content;
      badges(item.querySelector(".badges"), message.reply || {words: message.content.split(/\s+/).filter(Boolean).length,
                                                              hidden: true});
    }
    if (mode === "blind") column.querySelector(".name").textContent = view.sides[side].model || "";
  }
  if (mode === "blind") setVoting(!view.choice && !view.busy && view.turns > 0);
  if (view.choice) for (const button of document.querySelectorAll("#blind .regenerate")) button.remove(); // decided
}

async function loadSaved() {
  let listing;
  try { listing = await checked(await fetch("/api/conversations")); } catch (error) { showError(error.message); return; }
  $("#saved-file").textContent = listing.file;
  const list = $("#saved-list");
  list.textContent = "";
  for (const row of listing.conversations) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = row.title;
    open.addEventListener("click", () => reopen(row.id));
    const about = document.createElement("span");
    about.className = "note";
    const who = row.models ? row.models.join(", ") : "models hidden until the vote";
    about.textContent = ` ${row.blind ? "blind battle" : "side by side"} - ${who} - ${row.turns} turn${row.turns === 1 ? "" : "s"}` +
      ` - ${row.time}`;
    item.append(open, about);
    list.appendChild(item);
  }
  if (!listing.conversations.length) list.textContent = "No saved conversations yet.";
}

async function reopen(id) {
  showError("");
  try {
    const view = await post(`/api/conversations/${encodeURIComponent(id)}/open`);
    showTab(view.blind ? "blind" : "side");
    showConversation(view);
  } catch (error) { showError(error.message); }
}

// ---------------------------------------------------------------------------- the page

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  $("#composer").hidden = name !== "side" && name !== "blind";
  if (name === "board") loadBoard();
  if (name === "saved") loadSaved();
}

function newChat() {
  if (chats.side && $("#send").disabled) stop();
  chats.side = null;
  $("#side-columns").textContent = "";
  $("#prompt").focus();
}

async function start() {
  try { info = await checked(await fetch("/api/models")); } catch (error) { showError(error.message); return; }
  for (const key of SETTINGS) $("#" + key).value = info.settings[key];
  if (info.best_of > 1) { // the same for every model and side, so it names none in a blind battle
    $("#best-of-note").textContent = `Every reply is the best of ${info.best_of} samples, shown once all have ended.`;
    $("#best-of-note").hidden = false;
  }
  if (info.on_topic) { // a badge about each reply's text, scored once every reply of the turn has ended
    $("#best-of-note").textContent += (info.best_of > 1 ? " " : "") +
      "Each reply is marked on or off topic (does it answer the message?) once the turn's replies have all ended.";
    $("#best-of-note").hidden = false;
  }
  const picks = $("#model-picks");
  for (const model of info.models) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model;
    box.checked = true;
    box.addEventListener("change", newChat); // other models: another conversation
    label.append(box, " " + model);
    picks.appendChild(label);
  }
  const select = $("#prompt-set");
  for (const [set, prompts] of Object.entries(info.prompt_sets)) {
    const group = document.createElement("optgroup");
    group.label = set;
    for (const text of prompts) {
      const option = document.createElement("option");
      option.value = text;
      option.textContent = text;
      group.appendChild(option);
    }
    select.appendChild(group);
  }
  select.addEventListener("change", () => { if (select.value) $("#prompt").value = select.value; });
  const list = $("#report-list");
  for (const path of info.reports) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = "/reports/" + path.split("/").map(encodeURIComponent).join("/");
    link.target = "_blank"; // a new tab: going back would reload this page and lose its replies
    link.rel = "noopener";
    link.textContent = path;
    item.appendChild(link);
    list.appendChild(item);
  }
  if (!info.reports.length) list.textContent = "No reports: start the arena with --run outputs/runs/NAME.";
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("#send").addEventListener("click", send);
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", newChat);
  $("#next").addEventListener("click", nextBattle);
  for (const button of document.querySelectorAll("#votes button[data-choice]")) {
    button.addEventListener("click", () => vote(button.dataset.choice));
  }
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
    if (event.key === "Escape") event.target.blur(); // so 1-4 and N reach the battle
  });
  document.addEventListener("keydown", (event) => {
    if (["TEXTAREA", "INPUT", "SELECT"].includes(event.target.tagName) || $("#blind").hidden) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "n" || event.key === "N") { nextBattle(); event.preventDefault(); return; }
    const choice = {"1": "A", "2": "B", "3": "tie", "4": "bad"}[event.key];
    if (choice && !$("#votes button[data-choice]").disabled) vote(choice);
  });
  start();
});
