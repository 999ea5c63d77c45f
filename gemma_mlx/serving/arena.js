// The arena page: plain DOM, no build step. Model text is only ever set with textContent.
"use strict";

const $ = (selector) => document.querySelector(selector);
const SETTINGS = ["temperature", "top_p", "max_tokens", "repetition_penalty", "seed"];
let current = null; // the running blind battle: {id, done: {A, B}}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

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

function badges(box, reply) {
  box.textContent = "";
  const tags = [`${reply.words} words`];
  if (reply.cut) tags.push(`cut at ${reply.tokens} tokens`);
  else tags.push("stopped by itself");
  if (reply.loop) tags.push("loop");
  if (reply.stop_token && !["<end_of_turn>", "<eos>"].includes(reply.stop_token)) tags.push(`stopped by ${reply.stop_token}`);
  for (const tag of tags) {
    const span = document.createElement("span");
    span.className = "badge" + (tag.startsWith("cut") ? " cut" : tag === "loop" ? " loop" : "");
    span.textContent = tag;
    box.appendChild(span);
  }
}

// One reply streamed over server-sent events into a <pre>, then its badges; resolves when done.
function streamInto(url, column) {
  const pre = column.querySelector("pre.reply");
  const box = column.querySelector(".badges");
  pre.textContent = "";
  box.textContent = "writing...";
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

async function checked(response) {
  if (response.ok) return response.json();
  let message = `${response.status} ${response.statusText}`;
  try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
  throw new Error(message);
}

function prompt() {
  const text = $("#prompt").value.trim();
  if (!text) throw new Error("The prompt is empty. Type something, or pick a prompt from a prompt set.");
  return text;
}

async function askSelected() {
  showError("");
  let text;
  try { text = prompt(); } catch (error) { showError(error.message); return; }
  const models = [...document.querySelectorAll("#model-picks input:checked")].map((box) => box.value);
  if (!models.length) { showError("Tick at least one model."); return; }
  const columns = $("#side-columns");
  columns.textContent = "";
  $("#ask").disabled = true;
  const waits = models.map((model) => {
    const column = document.createElement("div");
    column.className = "column";
    column.dataset.model = model;
    const title = document.createElement("h2");
    title.textContent = model;
    const pre = document.createElement("pre");
    pre.className = "reply";
    const box = document.createElement("div");
    box.className = "badges";
    column.append(title, pre, box);
    columns.appendChild(column);
    const params = settingsQuery();
    params.set("model", model);
    params.set("prompt", text);
    return streamInto("/api/stream?" + params.toString(), column);
  });
  await Promise.all(waits);
  $("#ask").disabled = false;
}

function setVoting(enabled) {
  for (const button of document.querySelectorAll("#votes button")) button.disabled = !enabled;
}

async function startBattle() {
  showError("");
  $("#verdict").textContent = "";
  for (const side of ["A", "B"]) $(`#col-${side} .name`).textContent = "";
  setVoting(false);
  let id;
  try {
    const body = {prompt: prompt(), ...settingsObject()};
    ({id} = await checked(await fetch("/api/battle", {method: "POST", headers: {"Content-Type": "application/json"},
                                                      body: JSON.stringify(body)})));
  } catch (error) { showError(error.message); return; }
  current = {id, voted: false};
  $("#battle").disabled = true;
  const replies = await Promise.all(["A", "B"].map((side) =>
    streamInto(`/api/battle/${id}/stream?side=${side}`, $(`#col-${side}`))));
  $("#battle").disabled = false;
  if (current && current.id === id && replies.every((reply) => reply)) setVoting(true);
}

async function vote(choice) {
  if (!current || current.voted) return;
  setVoting(false);
  try {
    const result = await checked(await fetch("/api/vote", {method: "POST", headers: {"Content-Type": "application/json"},
                                                            body: JSON.stringify({id: current.id, choice})}));
    current.voted = true;
    showError(""); // a vote that failed before (a full disk) went through on this try
    $("#col-A .name").textContent = result.model_a;
    $("#col-B .name").textContent = result.model_b;
    const words = {A: "A is better", B: "B is better", tie: "a tie", bad: "both bad"};
    $("#verdict").textContent = `Your vote: ${words[choice]}. A was ${result.model_a}, B was ${result.model_b}.`;
    await loadBoard();
  } catch (error) { showError(error.message); setVoting(true); }
}

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

function showTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== name;
  $("#prompt-box").hidden = name === "board" || name === "reports";
  if (name === "board") loadBoard();
}

async function start() {
  let info;
  try { info = await checked(await fetch("/api/models")); } catch (error) { showError(error.message); return; }
  for (const key of SETTINGS) $("#" + key).value = info.settings[key];
  const picks = $("#model-picks");
  for (const model of info.models) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model;
    box.checked = true;
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
    link.textContent = path;
    item.appendChild(link);
    list.appendChild(item);
  }
  if (!info.reports.length) list.textContent = "No reports: start the arena with --run outputs/runs/NAME.";
  $("#battle").disabled = !info.blind;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab.dataset.tab));
  $("#ask").addEventListener("click", askSelected);
  $("#battle").addEventListener("click", startBattle);
  for (const button of document.querySelectorAll("#votes button")) button.addEventListener("click", () => vote(button.dataset.choice));
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "TEXTAREA" || event.target.tagName === "INPUT" || $("#blind").hidden) return;
    const choice = {"1": "A", "2": "B", "3": "tie", "4": "bad"}[event.key];
    if (choice && !$("#votes button").disabled) vote(choice);
  });
  start();
});
