"""Checks a `tessera export --format safetensors` directory against the Tessera checkpoint it came
from: Hugging Face transformers loads it (AutoModelForCausalLM, the class config.json names) and
its logits on windows of a text, tokenized by the exported tokenizer.json, are compared with
Tessera's forward of the checkpoint as bench/torch/model.py computes it (the PyTorch twin of
src/model that tests/model/golden_test.cpp holds Tessera's CPU forward to). Dense models only.

  python3 check_hf_export.py --checkpoint RUN/checkpoints/step_N --hf DIR [--text FILE]
         [--seq-len T] [--windows N] [--device cuda|cpu]

The export's dtype (config.json torch_dtype) sets the comparison:
  float32:  transformers in FP32 (TF32 off) against the reference in FP32: max |dlogit| must be
            <= 1e-4 * max(1, max |logit|) -- the same function, only the summation order differs.
  bfloat16: transformers in BF16 against the reference in FP32: the mean cross-entropy on the
            windows within 1% (and 0.02 nats), max |dlogit| <= 5% of max |logit| + 0.05 -- BF16
            keeps 8 bits of mantissa, so each layer's outputs carry ~0.4% relative rounding.
Prints one line per measure and PASS or FAIL; exit status 1 on FAIL, 2 on bad input.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, Transformer, load_tessera_weights, read_checkpoint  # noqa: E402


def windows(hf_dir, text_path, T, n, vocab):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    with open(text_path, encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    if len(ids) < T + 1:
        sys.exit(f"--text {text_path}: {len(ids)} tokens, fewer than a window of {T + 1}")
    n = min(n, (len(ids) - 1) // T)
    x = torch.tensor(ids[: n * T + 1], dtype=torch.long)
    if int(x.max()) >= vocab:
        sys.exit(f"tokenizer of {hf_dir} gave id {int(x.max())} >= vocab_size {vocab}")
    return x[:-1].view(n, T), x[1:].view(n, T)


def cross_entropy(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the Tessera step directory exported")
    ap.add_argument("--hf", required=True, help="the safetensors export directory")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "..",
                                                   "README.md"),
                    help="text to tokenize into windows (default: the repo's README.md)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoModelForCausalLM

    tensors, meta = read_checkpoint(a.checkpoint)
    if not tensors:
        sys.exit(f"--checkpoint {a.checkpoint}: no shard files")
    model_cfg = yaml.safe_load(meta["recipe"])["model"]
    cfg = Config(model_cfg)
    with open(os.path.join(a.hf, "config.json")) as f:
        hf_cfg = json.load(f)
    dtype_name = hf_cfg["torch_dtype"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype_name]
    V = cfg.vocab_size
    T = min(a.seq_len, cfg.max_seq_len)
    x, y = windows(a.hf, a.text, T, a.windows, V)
    x, y = x.to(a.device), y.to(a.device)

    ref = Transformer(cfg).float()
    load_tessera_weights(ref, tensors)
    ref = ref.to(a.device).eval()
    hf = AutoModelForCausalLM.from_pretrained(a.hf, torch_dtype=dtype).to(a.device).eval()
    cls = type(hf).__name__
    print(f"{a.hf}: transformers loaded {cls} ({dtype_name}); {x.shape[0]} windows of {T} tokens")
    if cls != hf_cfg["architectures"][0]:
        print(f"FAIL: config.json names {hf_cfg['architectures'][0]}, transformers built {cls}")
        return 1
    with torch.no_grad():
        want = ref(x)[0][..., :V].float()
        got = hf(x).logits[..., :V].float()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    ce_ref, ce_hf = cross_entropy(want, y), cross_entropy(got, y)
    print(f"max |logit| {scale:.4f}   max |dlogit| {diff:.3e}")
    print(f"cross-entropy: reference (Tessera forward, fp32) {ce_ref:.6f}   transformers {ce_hf:.6f}"
          f"   diff {ce_hf - ce_ref:+.2e}")
    if dtype == torch.float32:
        ok = diff <= 1e-4 * max(1.0, scale)
        bound = f"max |dlogit| <= {1e-4 * max(1.0, scale):.2e}"
    else:
        ok = diff <= 0.05 * scale + 0.05 and abs(ce_hf - ce_ref) <= max(0.02, 0.01 * ce_ref)
        bound = "max |dlogit| <= 5% max |logit| + 0.05 and |dCE| <= max(0.02, 1%)"
    print(f"{'PASS' if ok else 'FAIL'} ({dtype_name} tolerance: {bound})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
