// Golden check against PyTorch: a tiny model of each family, initialized by Tessera and loaded by
// bench/torch/model.py, must give PyTorch's logits, every parameter gradient, and the losses and
// final weights of 10 AdamW steps with clipping (all FP32). The golden files were produced by
// bench/torch/make_golden.py (PyTorch 2.11, CPU float32) and are committed.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "golden_setup.h"
#include "io/checkpoint.h"
#include "io/h5.h"
#include "model/transformer.h"
#include "optim/adamw.h"

namespace tessera {
namespace {

std::vector<float> read_f32(io::h5::File& f, const std::string& path) {
  io::h5::Handle ds = io::h5::open_dataset(f.ctx(), f.id(), path);
  const auto dims = io::h5::dataset_dims(f.ctx(), ds.id(), path);
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  std::vector<float> out(n);
  const std::vector<int64_t> zeros(dims.size(), 0);
  io::h5::read_box(f.ctx(), ds.id(), H5T_NATIVE_FLOAT, zeros, dims, out.data(), dims, zeros, path);
  return out;
}

std::vector<double> read_f64(io::h5::File& f, const std::string& path) {
  io::h5::Handle ds = io::h5::open_dataset(f.ctx(), f.id(), path);
  const auto dims = io::h5::dataset_dims(f.ctx(), ds.id(), path);
  std::vector<double> out(dims.at(0));
  io::h5::read_box(f.ctx(), ds.id(), H5T_NATIVE_DOUBLE, {0}, dims, out.data(), dims, {0}, path);
  return out;
}

// max |a - b| / max |b|: one number per tensor, insensitive to individual near-zero entries.
// The 1e-3 floor on the denominator (so with the 5e-5 gradient tolerance, 5e-8 absolute, the FP32
// rounding level of these O(1) losses) keeps gradients that are zero in exact arithmetic (the key
// bias: softmax ignores a shift shared by all keys; ~1e-9 of noise) from failing as noise over
// noise.
double rel_max_error(const float* a, const std::vector<float>& b) {
  double num = 0.0, den = 1e-3;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return num / den;
}

class Golden : public ::testing::TestWithParam<const char*> {};

TEST_P(Golden, MatchesPyTorch) {
  const std::string family = GetParam();
  const std::string src = TESSERA_SOURCE_DIR;
  const std::string golden_path = golden::golden_file(src, family);
  ASSERT_TRUE(std::filesystem::exists(golden_path))
      << golden_path << " missing: run bench/torch/make_golden.py on the GPU machine";
  const io::CheckpointReader init =
      io::CheckpointReader::open(golden::init_dir(src, family) + "/checkpoints/step_0");
  io::h5::File golden = io::h5::File::open_read(golden_path);

  const ModelConfig cfg = golden::config_for(family);
  Transformer model(cfg, DType::f32, Device::cpu);
  for (Param& p : model.params().all()) init.read_full(p.spec.name, p.value.data);
  const int B = golden::kBatch, T = golden::kSeq, S = golden::kSteps;
  std::vector<int32_t> tokens(int64_t(S) * B * T), targets(tokens.size());
  init.read_full("golden.tokens", tokens.data());
  init.read_full("golden.targets", targets.data());

  AdamWConfig acfg;
  acfg.beta1 = golden::kBeta1;
  acfg.beta2 = golden::kBeta2;
  acfg.eps = golden::kEps;
  acfg.weight_decay = golden::kWeightDecay;
  AdamW opt(model.params(), acfg);
  Activations acts(model, B, T, true);
  const std::vector<double> torch_losses = read_f64(golden, "losses");
  ASSERT_EQ(int(torch_losses.size()), S);

  double worst_logits = 0, worst_grad = 0, worst_loss = 0, worst_weight = 0;
  for (int step = 0; step < S; ++step) {
    Tensor tok(tokens.data() + int64_t(step) * B * T, DType::i32, Device::cpu, {B, T});
    Tensor tgt(targets.data() + int64_t(step) * B * T, DType::i32, Device::cpu, {B, T});
    model.params().zero_grad();
    const double loss = model.forward(acts, tok, tgt);
    // FP32 on both sides with different summation orders (BLAS blocking, PyTorch's kernels):
    // agreement is ~1e-7 relative per op, a few ulp growth through two layers; 1e-5 of each
    // tensor's largest magnitude is tight enough to catch any wrong term. (Read before backward,
    // which turns the logits into their gradient in place.)
    if (step == 0) {
      worst_logits = rel_max_error(model.logits(acts).ptr<float>(), read_f32(golden, "logits"));
      EXPECT_LE(worst_logits, 1e-5);
    }
    model.backward(acts, tok, tgt, 1.0f);
    if (step == 0) {
      for (const Param& p : model.params().all()) {
        const std::vector<float> g = read_f32(golden, "grads/" + p.spec.name);
        ASSERT_EQ(int64_t(g.size()), p.grad.numel()) << p.spec.name;
        const double e = rel_max_error(p.grad.ptr<float>(), g);
        worst_grad = std::max(worst_grad, e);
        EXPECT_LE(e, 5e-5) << "grad " << p.spec.name;
      }
    }
    // Loss agreement over 10 steps: updates compound rounding differences (measured ~2e-7).
    worst_loss = std::max(worst_loss, std::fabs(loss - torch_losses[step]) / torch_losses[step]);
    EXPECT_NEAR(loss, torch_losses[step], 2e-6 * std::fabs(torch_losses[step])) << "step " << step;
    const double norm = grad_norm(model.params());
    opt.step(model.params(), golden::kLr, clip_factor(norm, golden::kGradClip));
  }
  for (const Param& p : model.params().all()) {
    // The key bias has no effect on the output, so its gradient is rounding noise, which Adam
    // normalizes into full +-lr steps of arbitrary sign: its weights legitimately differ.
    if (p.spec.name.find("attn.wk.bias") != std::string::npos) continue;
    const std::vector<float> w = read_f32(golden, "params_after/" + p.spec.name);
    const double e = rel_max_error(p.value.ptr<float>(), w);
    worst_weight = std::max(worst_weight, e);
    EXPECT_LE(e, 2e-5) << "weights " << p.spec.name;
  }
  std::printf(
      "%s vs PyTorch: logits %.2e, grads %.2e, 10-step losses %.2e, weights %.2e "
      "(worst relative errors)\n",
      family.c_str(), worst_logits, worst_grad, worst_loss, worst_weight);
}

INSTANTIATE_TEST_SUITE_P(Families, Golden, ::testing::Values("gpt2", "llama"));

}  // namespace
}  // namespace tessera
