// The `tessera` command line, run as a process: the top-level help lists the commands; every
// command's --help (exit status 0) lists each of its options with a description and its default;
// bad arguments exit with status 2 and name the option and the value; and prepare's options
// (both "--flag value" and "--flag=value", "--" before inputs) reach the dataset it writes.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "tests/common/cli.h"
#include "tests/common/files.h"
#include "tests/export/export_test_util.h"

namespace tessera {
namespace {

using testing::CliResult;
using testing::run_cli;
using testing::run_cli_in;
using testing::ScratchDir;

bool has(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

// CLI11 prints each option or positional as "  NAME ...", its description starting at column 30
// on the same line or, when the name is longer, on the next line. Returns the names of entries
// without a description.
std::vector<std::string> undescribed_entries(const std::string& help) {
  std::vector<std::string> lines;
  for (size_t b = 0, e; b < help.size(); b = e + 1) {
    e = help.find('\n', b);
    if (e == std::string::npos) e = help.size();
    lines.push_back(help.substr(b, e - b));
  }
  std::vector<std::string> missing;
  bool in_list = false;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string& l = lines[i];
    if (l == "Options:" || l == "Positionals:" || l == "Subcommands:") in_list = true;
    if (l.empty()) in_list = false;
    if (!in_list || l.size() < 3 || l[0] != ' ' || l[1] != ' ' || l[2] == ' ') continue;
    const bool inline_text = l.size() > 30 && l[29] == ' ' && l[30] != ' ';
    const bool next_line_text = i + 1 < lines.size() && lines[i + 1].size() > 30 &&
                                lines[i + 1].substr(0, 30) == std::string(30, ' ');
    if (!inline_text && !next_line_text) missing.push_back(l);
  }
  return missing;
}

struct HelpCase {
  std::string args;
  std::vector<std::string> lists;  // option names, positionals and shown defaults
};

TEST(CliHelp, TopLevelListsEveryCommand) {
  const CliResult r = run_cli("--help");
  EXPECT_EQ(r.status, 0) << r.output;
  for (const char* c : {"train", "plan", "prepare", "tokenizer", "inspect", "Exit status"})
    EXPECT_TRUE(has(r.output, c)) << c << " missing in:\n" << r.output;
  EXPECT_TRUE(undescribed_entries(r.output).empty()) << r.output;
}

TEST(CliHelp, EveryCommandListsItsOptionsWithMeaningAndDefault) {
  const std::vector<HelpCase> cases = {
      {"train", {"RECIPE", "--set", "KEY=VALUE"}},
      {"plan", {"RECIPE", "--set", "--gpu-gb", "=80"}},
      {"prepare",
       {"INPUTS", "--tokenizer", "--train-tokenizer", "--tokenizer-out", "--out", "--val-fraction",
        "=0.05", "--doc-chars", "=8192", "--threads"}},
      {"tokenizer", {"train", "encode", "decode"}},
      {"tokenizer train",
       {"FILES", "--vocab-size", "--out", "--pre", "=gpt2", "--min-frequency", "=2"}},
      {"tokenizer encode", {"TEXT", "--tokenizer", "--no-special"}},
      {"tokenizer decode", {"IDS", "--tokenizer"}},
      {"inspect", {"PATH", "--recipe", "--no-stats"}},
      {"generate",
       {"MODEL",
        "--prompt",
        "--requests",
        "--out",
        "--n",
        "--device",
        "=auto",
        "--dtype",
        "--kv-cache-gb",
        "--block-size",
        "=16",
        "--max-context",
        "--max-num-seqs",
        "=64",
        "--max-batched-tokens",
        "=2048",
        "--ignore-eos",
        "--max-tokens",
        "=128",
        "--temperature",
        "=0.8",
        "--top-k",
        "=40",
        "--top-p",
        "=0.95",
        "--min-p",
        "=0.05",
        "--repetition-penalty",
        "--seed",
        "--stop",
        "--stop-token-id"}},
      {"serve",
       {"MODEL", "--port", "=8000", "--host", "=127.0.0.1", "--served-model-name", "--workers",
        "=128", "--kv-cache-gb", "--max-tokens", "--temperature"}},
  };
  for (const HelpCase& c : cases) {
    for (const char* help : {"--help", "-h"}) {
      const CliResult r = run_cli(c.args + " " + help);
      EXPECT_EQ(r.status, 0) << c.args << ":\n" << r.output;
      EXPECT_TRUE(has(r.output, "Usage: tessera " + c.args)) << r.output;
      for (const std::string& item : c.lists)
        EXPECT_TRUE(has(r.output, item)) << c.args << " --help lacks " << item << ":\n" << r.output;
      EXPECT_EQ(undescribed_entries(r.output), std::vector<std::string>{}) << r.output;
    }
  }
  // A command's help is its own: inspect's options are not in prepare's.
  EXPECT_FALSE(has(run_cli("prepare --help").output, "--no-stats"));
}

struct ErrorCase {
  std::string args;
  std::vector<std::string> names;  // the option and the value, or what is missing
};

TEST(CliErrors, BadArgumentsNameTheOptionAndValueWithStatusTwo) {
  const std::string p = "prepare --tokenizer gpt2 --out d.h5 ";
  const std::vector<ErrorCase> cases = {
      {"", {"Usage: tessera"}},
      {"frobnicate", {"unknown command 'frobnicate'"}},
      {p + "--frobnicate in", {"--frobnicate"}},
      {p + "--doc-chars 12x in", {"--doc-chars", "'12x'", "not an integer"}},
      {p + "--doc-chars=0 in", {"--doc-chars", "0", "below the minimum 1"}},
      {p + "--val-fraction 1.5 in", {"--val-fraction", "1.5", "[0, 1)"}},
      {p + "--threads -1 in", {"--threads", "-1"}},
      {p, {"INPUTS", "required"}},
      {"prepare --tokenizer gpt2 in", {"--out", "required"}},
      {"prepare --tokenizer gpt2 in --out", {"--out"}},
      {"prepare --tokenizer gpt2 --train-tokenizer 300 --out d.h5 in",
       {"--tokenizer", "--train-tokenizer"}},
      {"prepare --train-tokenizer -3 --out d.h5 in", {"--train-tokenizer", "-3"}},
      {"prepare --tokenizer gpt2 --tokenizer-out t.json --out d.h5 in",
       {"--tokenizer-out", "--train-tokenizer"}},
      {"prepare --out d.h5 in", {"exactly one of --tokenizer SPEC or --train-tokenizer N"}},
      {"train", {"RECIPE", "required"}},
      {"train r.yaml --bogus", {"--bogus"}},
      {"train r.yaml other.yaml", {"other.yaml"}},
      {"train r.yaml --set", {"--set"}},
      {"tokenizer", {"subcommand"}},
      {"tokenizer frob", {"'frob'"}},
      {"tokenizer train --out t.json f.txt", {"--vocab-size", "required"}},
      {"tokenizer train --vocab-size 300 --out t.json --pre bert f.txt", {"--pre", "bert"}},
      {"tokenizer train --vocab-size 300 --out t.json --min-frequency 0 f.txt",
       {"--min-frequency", "0"}},
      {"tokenizer encode --tokenizer gpt2", {"TEXT", "required"}},
      {"tokenizer decode --tokenizer gpt2 1,x", {"IDS", "'x'", "not an integer"}},
      {"inspect a.h5 b.h5", {"b.h5"}},
      {"inspect --frob a.h5", {"--frob"}},
      {"plan", {"RECIPE", "required"}},
      {"plan recipes/qwen3-30b-a3b.yaml --gpu-gb -1", {"--gpu-gb", "-1"}},
      {"plan recipes/qwen3-30b-a3b.yaml --set parallel.ep=3", {"parallel.ep = 3", "parallel.dp"}},
      {"generate m.h5", {"--prompt", "--requests"}},
      {"generate m.h5 --prompt x --requests r.jsonl", {"--prompt", "--requests"}},
      {"generate m.h5 --prompt x --max-tokens 0", {"--max-tokens", "0"}},
      {"generate m.h5 --prompt x --device gpu", {"--device", "gpu"}},
      {"generate /nonexistent/m.h5 --prompt x --device cpu", {"/nonexistent/m.h5"}},
      {"generate m.h5 --prompt x --temperature -1", {"temperature", "-1"}},
      {"generate m.h5 --prompt x --top-p 0", {"top_p", "0"}},
      {"serve m.h5 --port 70000", {"--port", "70000"}},
      {"serve", {"MODEL", "required"}},
  };
  for (const ErrorCase& c : cases) {
    const CliResult r = run_cli(c.args);
    EXPECT_EQ(r.status, 2) << "tessera " << c.args << ":\n" << r.output;
    for (const std::string& n : c.names)
      EXPECT_TRUE(has(r.output, n)) << "tessera " << c.args << " does not name " << n << ":\n"
                                    << r.output;
  }
}

// `tessera plan` on Qwen3-30B-A3B: one line per pipeline stage, and the verdict.
TEST(CliPlan, PrintsEveryStageOfTheLayout) {
  const CliResult r = run_cli(
      "plan recipes/qwen3-30b-a3b.yaml --set parallel.pp=4 --set parallel.ep=8 --gpu-gb 80");
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* s : {"30.532B parameters (3.353B active)", "dp 8 x tp 1 x pp 4, ep 8",
                        "\n0      0-11", "\n3      36-47", "fits"})
    EXPECT_TRUE(has(r.output, s)) << s << " missing in:\n" << r.output;
  const CliResult small = run_cli("plan recipes/qwen3-30b-a3b.yaml --set parallel.pp=4 --gpu-gb 1");
  EXPECT_TRUE(has(small.output, "does NOT fit in 1 GB")) << small.output;
}

// generate on a synthetic checkpoint: the prompt from stdin, the text on stdout, the rate on
// stderr; --requests writes one result per request, in order; a bad request line names the line.
TEST(CliGenerate, StreamsTheCompletionAndRunsRequestFiles) {
  ScratchDir dir;
  const Recipe r = testing::export_recipe(
      "  family: llama\n  num_layers: 2\n  hidden: 64\n  num_heads: 4\n  num_kv_heads: 2\n"
      "  ffn_hidden: 96\n  max_seq_len: 64\n");
  const std::string ckpt = testing::write_synthetic_checkpoint(dir / "run", r);
  const CliResult g = run_cli("generate " + ckpt + " --device cpu --prompt - --max-tokens 12 " +
                                  "--ignore-eos --temperature 0",
                              "echo 'It was a dark night' | ");
  ASSERT_EQ(g.status, 0) << g.output;
  EXPECT_TRUE(has(g.output, "generate: 6 prompt tokens, 12 generated in")) << g.output;
  EXPECT_TRUE(has(g.output, "tokens/s")) << g.output;
  testing::write_all(dir / "req.jsonl",
                     "{\"prompt\": \"It was\", \"max_tokens\": 3, \"temperature\": 0}\n\n"
                     "{\"prompt\": [1, 2, 3], \"max_tokens\": 5, \"seed\": 4}\n");
  const CliResult b = run_cli("generate " + ckpt + " --device cpu --ignore-eos --requests " +
                              (dir / "req.jsonl") + " --out " + (dir / "out.jsonl"));
  ASSERT_EQ(b.status, 0) << b.output;
  const std::string out = testing::read_all(dir / "out.jsonl");
  EXPECT_TRUE(has(out, "\"index\":0,") && has(out, "\"index\":1,")) << out;
  EXPECT_TRUE(has(out, "\"completion_tokens\":3") && has(out, "\"completion_tokens\":5")) << out;
  testing::write_all(dir / "bad.jsonl",
                     "{\"prompt\": \"x\", \"max_tokens\": 2}\n{\"prompt\": \"x\", \"n\": 2}\n");
  const CliResult bad =
      run_cli("generate " + ckpt + " --device cpu --requests " + (dir / "bad.jsonl"));
  EXPECT_EQ(bad.status, 2) << bad.output;
  EXPECT_TRUE(has(bad.output, "bad.jsonl: line 2: 'n' must be 1")) << bad.output;
}

TEST(CliPrepare, OptionsReachTheDataset) {
  ScratchDir dir;
  std::string text;
  for (int i = 0; i < 300; ++i)
    text += "The quick brown fox jumps over the lazy dog " + std::to_string(i) + ".\n\n";
  testing::write_all(dir / "in1.txt", text);
  testing::write_all(dir / "--in2.txt", text + text);
  const CliResult tok =
      run_cli_in(dir.str(), "tokenizer train --vocab-size 300 --out tok.json in1.txt");
  ASSERT_EQ(tok.status, 0) << tok.output;
  const CliResult r = run_cli_in(dir.str(),
                                 "prepare --tokenizer tok.json --out=o/d.h5 --val-fraction 0.1 "
                                 "--doc-chars=100 --threads 2 -- in1.txt --in2.txt");
  ASSERT_EQ(r.status, 0) << r.output;
  const TokenDataset ds = TokenDataset::open(dir / "o/d.h5");
  EXPECT_EQ(ds.meta().created_by,
            "tessera prepare --tokenizer tok.json --val-fraction 0.1 --doc-chars 100");
  EXPECT_EQ(ds.meta().doc_chars, 100);
  EXPECT_NEAR(ds.meta().val_fraction, 0.1, 1e-7);
  ASSERT_EQ(ds.meta().sources.size(), 2u);
  EXPECT_EQ(ds.meta().sources[0].name, "in1.txt");
  EXPECT_EQ(ds.meta().sources[1].name, "--in2.txt");
}

}  // namespace
}  // namespace tessera
