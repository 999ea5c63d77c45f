// The text rules the page shares with gemma-mlx's Python side; tests/test_web.py checks both give
// the same answers.

// ------------------------------------------------------------------ Gemma's turn format
// The same text as gemma_mlx/chat_format.py render(): a system prompt is folded into the first
// user turn, every turn is trimmed, and the prompt ends with an open model turn.
const BOS = '<bos>';
const START_OF_TURN = '<start_of_turn>';
const END_OF_TURN = '<end_of_turn>';

export function renderPrompt(turns, system, withBos) {
  let pending = system ? `${system}\n\n` : '';
  const parts = [withBos ? BOS : ''];
  for (const turn of turns) {
    const prefix = turn.role === 'user' ? pending : '';
    if (turn.role === 'user') pending = '';
    parts.push(`${START_OF_TURN}${turn.role}\n${prefix}${turn.text.trim()}${END_OF_TURN}\n`);
  }
  parts.push(`${START_OF_TURN}model\n`);
  return parts.join('');
}

// ------------------------------------------------------------------ reply flags
// "loop": the rule of `gemma-mlx compare` (gemma_mlx/text.py), with its numbers from settings.json:
// the words that lie inside a word n-gram (n = 4) occurring 3 or more times in the reply make up at
// least half (0.5) of its words. "a big house with a big house with a big house" is a loop; a reply
// that says one phrase twice is not. Words are letters and digits with inner apostrophes, lowercased.
const WORD = /[\p{L}\p{N}]+(?:'[\p{L}\p{N}]+)*/gu;

export function words(text) {
  return (text.replace(/[\u2019\u2018\u02bc]/g, "'").match(WORD) || []).map((w) => w.toLowerCase());
}

export function loopCoverage(text, n, repeats) {
  const tokens = words(text);
  if (tokens.length < n) return 0;
  const counts = new Map();
  const grams = [];
  for (let i = 0; i + n <= tokens.length; i++) {
    const gram = tokens.slice(i, i + n).join('\u0000');
    grams.push(gram);
    counts.set(gram, (counts.get(gram) || 0) + 1);
  }
  const covered = new Array(tokens.length).fill(false);
  grams.forEach((gram, start) => {
    if (counts.get(gram) >= repeats) covered.fill(true, start, start + n);
  });
  return covered.filter(Boolean).length / tokens.length;
}
