// Chat with an exported persona in the browser: llama.cpp compiled to WebAssembly (wllama) runs the
// GGUF model in this tab. The page reads model.gguf and settings.json from its own folder and loads
// nothing from anywhere else.
//
// For scripts and tests: index.html?prompt=Hello&max_tokens=16&temperature=0 answers that prompt on
// load. The reply goes into the element with id "reply", which then carries
//   data-done="1"       when the reply has ended
//   data-finish         "stop" (an end token or a stop string), "length" (max_tokens reached),
//                       "abort" (the Stop button) or "error"
//   data-tokens         the generated token ids, comma-separated (the end token is not included)
//   data-tokens-per-second
// The URL may also set top_p and repeat_penalty (temperature=0 is greedy decoding), threads (how many
// threads llama.cpp uses; the default is half the cores) and debug=1 (llama.cpp's full log in the console).
import { Wllama, WllamaAbortError } from './vendor/wllama/wllama.js';
import { loopCoverage, renderPrompt } from './turns.js';

const VENDOR = new URL('vendor/wllama/', import.meta.url);
const ASSETS = { default: new URL('wllama.wasm', VENDOR).href };
// Safari has neither JSPI nor 64-bit wasm memory; wllama then switches to this build by itself.
const COMPAT = { worker: new URL('compat/wllama.js', VENDOR).href, wasm: new URL('compat/wllama.wasm', VENDOR).href };
const CONTEXT_TOKENS = 4096; // prompt + reply; a longer conversation asks for a new chat

// ------------------------------------------------------------------ settings
const DECODING = {
  temperature: { min: 0, max: Infinity, what: '0 (greedy) or more' },
  top_p: { min: Number.MIN_VALUE, max: 1, what: 'in (0, 1]' },
  repeat_penalty: { min: Number.MIN_VALUE, max: Infinity, what: 'above 0 (1 turns it off)' },
  max_tokens: { min: 1, max: CONTEXT_TOKENS, what: `a whole number from 1 to ${CONTEXT_TOKENS}`, whole: true },
};

async function loadSettings() {
  const response = await fetch('settings.json', { cache: 'no-cache' });
  if (!response.ok) throw new Error(`settings.json could not be read (HTTP ${response.status}).`);
  return response.json();
}

// The persona's defaults, then any override from the URL (?temperature=0&max_tokens=16).
function decodingSettings(settings, query) {
  const chosen = {};
  for (const [key, rule] of Object.entries(DECODING)) {
    const fromUrl = query.get(key);
    const value = fromUrl === null ? settings[key] : Number(fromUrl);
    if (typeof value !== 'number' || Number.isNaN(value) || value < rule.min || value > rule.max
        || (rule.whole && !Number.isInteger(value))) {
      const where = fromUrl === null ? 'in settings.json' : 'in the URL';
      throw new Error(`${key} is ${fromUrl ?? value} ${where}; it must be ${rule.what}.`);
    }
    chosen[key] = value;
  }
  return chosen;
}

// ------------------------------------------------------------------ the model
class Model {
  constructor(blob, { verbose, threads }) {
    this.blob = blob;
    this.verbose = verbose;
    this.threads = threads; // undefined: wllama's choice, half the cores when the page is cross-origin isolated
    this.wllama = null;
    this.firstError = null; // the first error llama.cpp logged during the current reply
  }

  async start() {
    const quiet = () => {};
    // llama.cpp's own error lines say what went wrong; the exception wllama throws after them often does not
    const error = (...args) => {
      if (this.firstError === null) this.firstError = args.map(String).join(' ').split('\n')[0];
      console.error(...args);
    };
    const logger = { debug: this.verbose ? console.debug : quiet, log: console.log, warn: console.warn, error };
    const wllama = new Wllama(ASSETS, { logger });
    wllama.setCompat(COMPAT); // the vendored copy, never wllama's default CDN
    // llama.cpp log levels: 1 debug ... 4 error
    await wllama.loadModel([this.blob], {
      n_ctx: CONTEXT_TOKENS, n_threads: this.threads, log_level: this.verbose ? 1 : 3,
    });
    const info = wllama.getLoadedContextInfo();
    // llama.cpp ends a reply on its end-of-generation tokens: for a Gemma file <eos> (1) and <end_of_turn> (106)
    const ends = info.list_tokens_eog || [];
    if (!ends.includes(1) || !ends.includes(106)) {
      console.warn(`llama.cpp ends replies on tokens ${ends.join(', ')}, not on <eos> (1) and <end_of_turn> (106)`);
    }
    // Our prompt carries its own <bos> unless llama.cpp adds one itself (add_bos_token): one, never two.
    // (wllama 3.13's kv_overrides cannot switch add_bos_token off: llama.cpp aborts on them.)
    this.addsBos = Boolean(info.add_bos_token);
    this.wllama = wllama;
    return { threads: wllama.getNumThreads(), multithread: wllama.isMultithread(), info };
  }

  async stop() {
    const wllama = this.wllama;
    this.wllama = null;
    if (wllama) await wllama.exit().catch(() => {});
  }

  // Generate one reply; onPiece(text) gets the text as it comes. Resolves to what happened.
  async reply(prompt, decoding, stop, { signal, wantIds, onPiece }) {
    const ids = [];
    let text = '', finish = null, timings = null, usage = null, chunks = 0, first = null;
    this.firstError = null;
    try {
      await this.wllama.createCompletion({
        prompt,
        stream: true,
        max_tokens: decoding.max_tokens,
        temperature: decoding.temperature,
        top_p: decoding.top_p,
        top_k: 0, // off, and min_p too: only the persona's settings shape the distribution, as in compare
        min_p: 0,
        repeat_penalty: decoding.repeat_penalty,
        repeat_last_n: 20, // mlx-lm's repetition_context_size, which compare uses
        stop,
        // token ids come with token probabilities, extra work over the vocabulary at every step, so only
        // scripts and tests ask for them
        n_probs: wantIds ? 1 : 0,
        cache_prompt: true, // the next turn reuses this conversation's prefix
        abortSignal: signal,
        onData: (chunk) => {
          const choice = chunk.choices && chunk.choices[0];
          if (chunk.timings) timings = chunk.timings;
          if (chunk.usage) usage = chunk.usage;
          if (!choice) return;
          if (choice.finish_reason) finish = choice.finish_reason;
          for (const p of (choice.logprobs && choice.logprobs.content) || []) ids.push(p.id);
          if (!choice.finish_reason) {
            chunks += 1;
            if (first === null) first = performance.now();
          }
          if (choice.text) {
            text += choice.text;
            onPiece(choice.text);
          }
        },
      });
    } catch (error) {
      if (!(error instanceof WllamaAbortError) && !(signal.aborted)) {
        const cause = this.firstError;
        if (cause && !cause.includes(error.message)) throw new Error(`${cause} (then: ${error.message || error})`);
        throw error;
      }
      finish = 'abort';
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const perSecond = timings && timings.predicted_per_second ? timings.predicted_per_second
      : (seconds > 0 ? Math.max(tokens - 1, 0) / seconds : 0);
    return { text, ids, finish: finish || 'stop', tokens, perSecond };
  }
}

async function download(url, onProgress) {
  const response = await fetch(url, { cache: 'no-cache' });
  if (!response.ok) throw new Error(`${url} could not be read (HTTP ${response.status}).`);
  const total = Number(response.headers.get('Content-Length')) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    loaded += value.byteLength;
    onProgress(loaded, total);
  }
  return new Blob(parts);
}

// ------------------------------------------------------------------ the page
const $ = (id) => document.getElementById(id);
const ui = {
  name: $('name'), defaults: $('defaults'), status: $('status'), progress: $('progress'),
  messages: $('messages'), form: $('composer'), input: $('input'),
  send: $('send'), stop: $('stop'), clear: $('clear'), runtime: $('runtime'),
};

const state = { settings: null, decoding: null, model: null, turns: [], busy: false, controller: null, scripted: false };

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

function setStatus(text) {
  ui.status.textContent = text;
}

function showError(message) {
  const box = document.createElement('p');
  box.className = 'error';
  box.textContent = message;
  ui.messages.append(box);
  setStatus('');
}

function showDefaults(settings, decoding) {
  ui.name.textContent = settings.name;
  document.title = `${settings.name}: chat`;
  const shown = { temperature: decoding.temperature === 0 ? '0 (greedy)' : decoding.temperature,
                  top_p: decoding.top_p, 'repeat penalty': decoding.repeat_penalty, 'max tokens': decoding.max_tokens };
  for (const [label, value] of Object.entries(shown)) {
    const item = document.createElement('div');
    const dt = document.createElement('dt');
    const dd = document.createElement('dd');
    dt.textContent = label;
    dd.textContent = String(value);
    item.append(dt, dd);
    ui.defaults.append(item);
  }
}

function addMessage(role, text) {
  const box = document.createElement('div');
  box.className = `message ${role}`;
  const body = document.createElement('p');
  body.className = 'text';
  body.textContent = text; // model text is text, never HTML
  box.append(body);
  ui.messages.append(box);
  box.scrollIntoView({ block: 'end' });
  return { box, body };
}

function setBusy(busy) {
  state.busy = busy;
  const ready = state.model !== null;
  ui.input.disabled = !ready;
  ui.send.disabled = busy || !ready;
  ui.clear.disabled = busy || !ready;
  ui.stop.disabled = !busy;
}

function addMeta(box, result) {
  const meta = document.createElement('div');
  meta.className = 'meta';
  const badge = (text, kind, title) => {
    const b = document.createElement('span');
    b.className = `badge ${kind}`;
    b.textContent = text;
    b.title = title;
    meta.append(b);
  };
  if (result.finish === 'length') {
    badge('cut', 'cut', `The reply reached max_tokens (${state.decoding.max_tokens}) before it ended.`);
  }
  const rule = state.settings.loop; // compare's rule, written by gemma_mlx/web.py from gemma_mlx/text.py
  if (rule && loopCoverage(result.text, rule.ngram, rule.repeats) >= rule.coverage) {
    badge('loop', 'loop', `Runs of ${rule.ngram} words that occur ${rule.repeats} or more times cover `
                          + `${rule.coverage * 100}% or more of the reply.`);
  }
  if (result.finish === 'abort') badge('stopped', 'stopped', 'You stopped this reply.');
  const speed = document.createElement('span');
  speed.textContent = `${result.tokens} tokens, ${result.perSecond.toFixed(1)} tokens/s`;
  meta.append(speed);
  box.append(meta);
}

async function ask(text) {
  if (state.busy || !state.model || !text.trim()) return;
  state.turns.push({ role: 'user', text });
  addMessage('user', text.trim());
  const previous = document.getElementById('reply');
  if (previous) previous.removeAttribute('id');
  const { box, body } = addMessage('model', '');
  body.id = 'reply';
  setBusy(true);
  state.controller = new AbortController();
  setStatus('Writing…');
  let streamed = '';
  try {
    if (!state.model.wllama) await startModel();
    const prompt = renderPrompt(state.turns, state.settings.system, !state.model.addsBos);
    const result = await state.model.reply(prompt, state.decoding, state.settings.stop, {
      signal: state.controller.signal,
      wantIds: state.scripted,
      onPiece: (piece) => {
        streamed += piece;
        body.textContent = streamed.trimStart();
        box.scrollIntoView({ block: 'end' });
      },
    });
    body.textContent = result.text.trim(); // what llama.cpp wrote, without the blank lines around it
    state.turns.push({ role: 'model', text: result.text });
    addMeta(box, result);
    Object.assign(body.dataset, { tokens: result.ids.join(','), finish: result.finish,
                                  tokensPerSecond: result.perSecond.toFixed(2) });
    setStatus(result.finish === 'abort' ? 'Stopped.' : 'Ready.');
  } catch (error) {
    console.error(error);
    state.turns.pop(); // the question stays on screen; it is not part of the next prompt
    body.dataset.finish = 'error';
    body.dataset.error = String(error && error.message ? error.message : error);
    const hint = /context|kv.?cache/i.test(body.dataset.error)
      ? 'The conversation is longer than the model\'s context: start a new chat.'
      : 'The model restarts for your next message.';
    const note = document.createElement('p');
    note.className = 'error';
    note.textContent = `The model stopped with an error: ${body.dataset.error.replace(/\.$/, '')}. ${hint}`;
    box.append(note);
    await state.model.stop(); // a crashed wasm module cannot be used again; start a fresh one next time
  } finally {
    body.dataset.done = '1';
    state.controller = null;
    setBusy(false);
  }
}

async function startModel() {
  setStatus('Starting llama.cpp…');
  const started = await state.model.start();
  const build = started.multithread ? `${started.threads} threads` : 'one thread';
  ui.runtime.textContent = `llama.cpp runs on ${build} here.`;
}

function wireComposer() {
  ui.form.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = ui.input.value;
    if (!text.trim() || state.busy) return;
    ui.input.value = '';
    ask(text);
  });
  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.stop.addEventListener('click', () => state.controller && state.controller.abort());
  ui.clear.addEventListener('click', () => {
    state.turns = [];
    ui.messages.replaceChildren();
    setStatus('Ready.');
    ui.input.focus();
  });
}

async function main() {
  if (location.protocol === 'file:') {
    showError('Open this page through a web server, not as a file: browsers do not let a file page read model.gguf. '
              + 'Run `gemma-mlx web DIR` (or any static file server) in its folder and open the address it prints.');
    return;
  }
  const query = new URLSearchParams(location.search);
  try {
    state.settings = await loadSettings();
    state.decoding = decodingSettings(state.settings, query);
  } catch (error) {
    showError(`This page cannot start: ${error.message}`);
    return;
  }
  showDefaults(state.settings, state.decoding);
  wireComposer();
  state.scripted = query.has('prompt');
  try {
    ui.progress.hidden = false;
    const blob = await download('model.gguf', (loaded, total) => {
      ui.progress.value = total ? loaded / total : 0;
      setStatus(`Loading the model… ${megabytes(loaded)}${total ? ` of ${megabytes(total)}` : ''}`);
    });
    ui.progress.hidden = true;
    const threads = Number.parseInt(query.get('threads'), 10);
    state.model = new Model(blob, { verbose: query.get('debug') === '1', threads: threads > 0 ? threads : undefined });
    await startModel();
  } catch (error) {
    console.error(error);
    ui.progress.hidden = true;
    state.model = null;
    showError(`The model could not be loaded: ${error && error.message ? error.message : error}. `
              + 'The browser console has llama.cpp\'s own messages.');
    return;
  }
  setBusy(false);
  setStatus('Ready.');
  if (state.scripted) {
    await ask(query.get('prompt'));
  } else {
    ui.input.focus();
  }
}

main();
