// Loads a GGUF file in llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU build, no GPU, no build)
// and prints JSON about it: the warnings llama.cpp logged while loading, llama.cpp's own
// tokenization of given texts, a greedy continuation of a prompt (token ids in and out, so no
// detokenizer is involved) and the perplexity of a token sequence scored in consecutive windows
// exactly as Tessera's `tessera perplexity` scores it (export/reference_eval.h).
//
//   node llama_cpp_check.mjs NODE_LLAMA_CPP_DIR INPUT.json
// INPUT: {"models": ["x.gguf", ...], "threads": 2,  -> {"results": [one object per model]}
//         "tokenize": ["text", ...],                 -> "tokenized": [[ids], ...]
//         "prompt_ids": [...], "generate": 32,       -> "generated": [ids]
//         "text_ids": [...], "ctx": 128}             -> "perplexity", "nll_sum", "tokens_scored",
//                                                       per scored position "nll" and "top1"
// Probabilities come from controlledEvaluate (generateNext.probabilities at temperature 0: the
// softmax of the whole logit row, in f32).
import path from "node:path";
import fs from "node:fs";
import {pathToFileURL} from "node:url";

const [packageDir, inputPath] = process.argv.slice(2);
if (!packageDir || !inputPath) {
  console.error("usage: node llama_cpp_check.mjs NODE_LLAMA_CPP_DIR INPUT.json");
  process.exit(2);
}
const input = JSON.parse(fs.readFileSync(inputPath, "utf8"));
const entry = path.join(packageDir, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

const log = [];
const llama = await getLlama({
  gpu: false,
  build: "never",
  usePrebuiltBinaries: true,
  progressLogs: false,
  logLevel: LlamaLogLevel.debug,
  logger(level, message) {
    log.push({level, message: message.trimEnd()});
  },
});
// One model: load (its warnings are the log lines logged while loading), tokenize, generate, score.
async function check(modelPath) {
  const firstLine = log.length;
  const model = await llama.loadModel({modelPath, gpuLayers: 0});
  const out = {
    model: modelPath,
    description: model.typeDescription,
    load_warnings: log.slice(firstLine)
        .filter((l) => l.level === LlamaLogLevel.warn || l.level === LlamaLogLevel.error)
        .map((l) => l.message)
        .filter((m) => m.trim().length > 0),
  };
  out.tokenized = (input.tokenize ?? []).map((text) => Array.from(model.tokenize(text, false)));

  const ctxLen = input.ctx ?? model.trainContextSize;
  const context = await model.createContext({
    contextSize: ctxLen,
    batchSize: ctxLen,
    sequences: 1,
    threads: input.threads ?? 2,
  });
  const sequence = context.getSequence();

  if (input.prompt_ids && input.generate) {
    const generated = [];
    for await (const token of sequence.evaluate(input.prompt_ids, {temperature: 0, yieldEogToken: true})) {
      generated.push(token);
      if (generated.length >= input.generate) break;
    }
    out.generated = generated;
  }

  if (input.text_ids) {
    const ids = input.text_ids;
    const nll = [];
    const top1 = [];
    for (let start = 0; start + 1 < ids.length; start += ctxLen) {
      const window = ids.slice(start, start + ctxLen);
      if (window.length < 2) break;
      await sequence.clearHistory();
      const items = window.map((t, i) => (i + 1 < window.length
          ? [t, {generateNext: {probabilities: true, options: {temperature: 0}}}]
          : t));
      const results = await sequence.controlledEvaluate(items);
      for (let i = 0; i + 1 < window.length; i++) {
        const probabilities = results[i]?.next?.probabilities;
        const p = probabilities?.get(window[i + 1]) ?? 0;
        nll.push(p > 0 ? -Math.log(p) : null);
        top1.push(probabilities ? probabilities.keys().next().value : null);  // sorted: highest first
      }
    }
    const finite = nll.filter((x) => x !== null);
    const nllSum = finite.reduce((a, b) => a + b, 0);
    out.nll = nll;
    out.top1 = top1;
    out.nll_sum = nllSum;
    out.tokens_scored = finite.length;
    out.zero_probability = nll.length - finite.length;
    out.perplexity = Math.exp(nllSum / finite.length);
  }
  await context.dispose();
  await model.dispose();
  return out;
}

const results = [];
for (const modelPath of input.models) results.push(await check(modelPath));
await llama.dispose();
console.log(JSON.stringify({results, log_lines: log.length}));
